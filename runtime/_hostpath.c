/* edgegen.runtime._hostpath: a call's host-side steps in native code.
 *
 * Right after an engine run has evicted the CPU caches, every Python or numpy operation a call makes
 * costs 5-10x what it costs warm (`python -m benchmarks.host_steps`): the interpreter and numpy touch
 * far more memory than the work needs. These functions do the same work touching little:
 *
 *   noise(seeds, out)   out (float32, C-contiguous) split into len(seeds) equal slices, slice i getting
 *                       numpy.random.default_rng(seeds[i]).standard_normal(n, dtype=float32): numpy's
 *                       SeedSequence and PCG64 seeding redone here, then numpy's own float ziggurat
 *                       (random_standard_normal_fill_f from the libnpyrandom numpy ships for extensions).
 *   words(prompt, first, later, head, tail, max_length)
 *                       a plain prompt's token ids from the tokenizer's word cache (tokenize.py): head, then
 *                       each word's ids (first[word] for the first word, later[word] after), then tail; None
 *                       when the prompt is not plain (ASCII letters and digits, words one space apart), a
 *                       word is not cached, or the ids would pass max_length.
 *   tokens(rows, ids, mask, length, pad_id)
 *                       rows (a list of lists of ints) written right-padded into the int64 buffers ids
 *                       and mask, (len(rows), length) each: ids[i] = row, then pad_id; mask[i] = 1s, then 0s.
 *   take(array, row, count)
 *                       the bytes of array[row, :count] (a C-contiguous buffer of two or more dims): a
 *                       prompt's text states, kept by the pipeline's text cache.
 *
 * The pure-Python path in pipeline.py / tokenize.py gives the same values (tested against each other);
 * it runs where this module could not be built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "numpy/random/bitgen.h"

#ifndef __SIZEOF_INT128__
#error "needs a compiler with 128-bit integers (gcc, clang); edgegen then runs its pure-Python host path"
#endif

/* from numpy/random/distributions.h, which pulls in numpy's whole C API: the one function used */
extern void random_standard_normal_fill_f(bitgen_t *bitgen_state, Py_ssize_t cnt, float *out);

typedef unsigned __int128 u128;
typedef struct {
    u128 state, inc;
    int has_uint32;
    uint32_t uinteger;
} pcg64;

static const u128 PCG_MULT = ((u128)0x2360ED051FC65DA4ULL << 64) | 0x4385DF649FCCF645ULL;

/* numpy's PCG64: step the 128-bit LCG, then output XSL-RR */
static uint64_t pcg64_next64(void *st) {
    pcg64 *p = st;
    p->state = p->state * PCG_MULT + p->inc;
    uint64_t x = (uint64_t)(p->state >> 64) ^ (uint64_t)p->state;
    unsigned r = (unsigned)(p->state >> 122);
    return (x >> r) | (x << ((-r) & 63));
}

/* numpy hands out the two halves of a 64-bit draw, low half first */
static uint32_t pcg64_next32(void *st) {
    pcg64 *p = st;
    if (p->has_uint32) {
        p->has_uint32 = 0;
        return p->uinteger;
    }
    uint64_t v = pcg64_next64(st);
    p->has_uint32 = 1;
    p->uinteger = (uint32_t)(v >> 32);
    return (uint32_t)v;
}

static double pcg64_next_double(void *st) { return (double)(pcg64_next64(st) >> 11) * (1.0 / 9007199254740992.0); }

static inline uint32_t seq_hash(uint32_t value, uint32_t *mult) {
    /* SeedSequence's hashmix: xor with the running constant, multiply by it, advance it, xor-shift */
    value ^= *mult;
    *mult *= 0x931E8875u;
    value *= *mult;
    return value ^ (value >> 16);
}

/* np.random.PCG64(seed) for seed in [0, 2**64): SeedSequence(seed) with its pool of four words,
 * generate_state(4, uint64), then PCG64's seeding (two LCG steps from state 0). */
static void pcg64_seed(pcg64 *p, uint64_t seed) {
    uint32_t entropy[4] = {(uint32_t)seed, (uint32_t)(seed >> 32), 0, 0};
    uint32_t pool[4], mult = 0x43B0D7E5u;
    for (int i = 0; i < 4; i++)
        pool[i] = seq_hash(entropy[i], &mult);
    for (int src = 0; src < 4; src++)
        for (int dst = 0; dst < 4; dst++)
            if (src != dst) {
                uint32_t v = 0xCA01F9DDu * pool[dst] - 0x4973F715u * seq_hash(pool[src], &mult);
                pool[dst] = v ^ (v >> 16);
            }
    uint32_t w[8], out_mult = 0x8B51F9DDu;
    for (int i = 0; i < 8; i++) {
        uint32_t v = (pool[i & 3] ^ out_mult) * (out_mult * 0x58F38DEDu);
        out_mult *= 0x58F38DEDu;
        w[i] = v ^ (v >> 16);
    }
    u128 initstate = ((u128)(w[0] | (uint64_t)w[1] << 32) << 64) | (w[2] | (uint64_t)w[3] << 32);
    u128 inc = (((u128)(w[4] | (uint64_t)w[5] << 32) << 64) | (w[6] | (uint64_t)w[7] << 32)) << 1 | 1;
    p->inc = inc;
    p->state = (inc + initstate) * PCG_MULT + inc;
    p->has_uint32 = 0;
    p->uinteger = 0;
}

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, const char *kinds, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    char kind = f[strlen(f) - 1];
    if (view->itemsize != itemsize || !strchr(kinds, kind)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a buffer of %zd-byte items (%s), got format %s", what,
                     itemsize, kinds, f);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *noise(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "noise(seeds: list[int], out: float32 buffer)");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(args[0]);
    Py_buffer out;
    if (get_buffer(args[1], &out, 4, "f", "noise out") < 0)
        return NULL;
    Py_ssize_t items = out.len / 4;
    if (count == 0 || items % count) {
        PyErr_Format(PyExc_ValueError, "noise: %zd values do not split into %zd seeds", items, count);
        PyBuffer_Release(&out);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long seed = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(args[0], i));  /* raises past 2**64 */
        if (seed == (unsigned long long)-1 && PyErr_Occurred()) {
            PyBuffer_Release(&out);
            return NULL;
        }
        pcg64 state;
        pcg64_seed(&state, seed);
        bitgen_t bits = {&state, pcg64_next64, pcg64_next32, pcg64_next_double, pcg64_next64};
        random_standard_normal_fill_f(&bits, items / count, (float *)out.buf + i * (items / count));
    }
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyObject *tokens(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "tokens(rows: list[list[int]], ids, mask, length: int, pad_id: int)");
        return NULL;
    }
    Py_ssize_t length = PyLong_AsSsize_t(args[3]);
    long long pad_id = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(args[0]);
    Py_buffer ids, mask;
    if (get_buffer(args[1], &ids, 8, "lqLQ", "tokens ids") < 0)
        return NULL;
    if (get_buffer(args[2], &mask, 8, "lqLQ", "tokens mask") < 0) {
        PyBuffer_Release(&ids);
        return NULL;
    }
    PyObject *result = NULL;
    if (length < 0 || ids.len != count * length * 8 || mask.len != ids.len) {
        PyErr_Format(PyExc_ValueError, "tokens: buffers of %zd and %zd bytes for %zd rows of %zd", ids.len,
                     mask.len, count, length);
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = PyList_GET_ITEM(args[0], i);
        if (!PyList_Check(row) || PyList_GET_SIZE(row) > length) {
            PyErr_Format(PyExc_ValueError, "tokens: row %zd is not a list of at most %zd ids", i, length);
            goto done;
        }
        int64_t *id_row = (int64_t *)ids.buf + i * length, *mask_row = (int64_t *)mask.buf + i * length;
        Py_ssize_t n = PyList_GET_SIZE(row), k;
        for (k = 0; k < n; k++) {
            long long v = PyLong_AsLongLong(PyList_GET_ITEM(row, k));
            if (v == -1 && PyErr_Occurred())
                goto done;
            id_row[k] = v;
            mask_row[k] = 1;
        }
        for (; k < length; k++) {
            id_row[k] = pad_id;
            mask_row[k] = 0;
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&ids);
    PyBuffer_Release(&mask);
    return result;
}

static int is_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }

static PyObject *words(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyUnicode_Check(args[0]) || !PyDict_Check(args[1]) || !PyDict_Check(args[2]) ||
        !PyList_Check(args[3]) || !PyList_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "words(prompt: str, first: dict, later: dict, head: list, tail: list, max_length: int)");
        return NULL;
    }
    Py_ssize_t max_length = PyLong_AsSsize_t(args[5]);
    if (max_length == -1 && PyErr_Occurred())
        return NULL;
    PyObject *prompt = args[0];
    if (!PyUnicode_IS_ASCII(prompt))
        Py_RETURN_NONE;
    const char *text = (const char *)PyUnicode_DATA(prompt);
    Py_ssize_t size = PyUnicode_GET_LENGTH(prompt);
    for (Py_ssize_t i = 0; i < size; i++)  /* plain: words of letters and digits, one space apart */
        if (!is_alnum(text[i]) && !(text[i] == ' ' && i > 0 && i + 1 < size && text[i - 1] != ' '))
            Py_RETURN_NONE;
    if (size == 0)
        Py_RETURN_NONE;
    PyObject *ids = PyList_GetSlice(args[3], 0, PY_SSIZE_T_MAX);  /* a new list, head's ids first */
    if (ids == NULL)
        return NULL;
    for (Py_ssize_t start = 0; start < size;) {
        Py_ssize_t end = start;
        while (end < size && text[end] != ' ')
            end++;
        PyObject *word = PyUnicode_FromStringAndSize(text + start, end - start);
        PyObject *known = word ? PyDict_GetItemWithError(start == 0 ? args[1] : args[2], word) : NULL;  /* borrowed */
        Py_XDECREF(word);
        if (known == NULL || !PyList_Check(known)) {
            Py_DECREF(ids);
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_NONE;  /* a word not cached: the tokenizers library tokenizes the prompt */
        }
        if (PyList_SetSlice(ids, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, known) < 0) {
            Py_DECREF(ids);
            return NULL;
        }
        start = end + 1;
    }
    if (PyList_SetSlice(ids, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, args[4]) < 0) {
        Py_DECREF(ids);
        return NULL;
    }
    if (PyList_GET_SIZE(ids) > max_length) {  /* truncation: the library's rules and its report */
        Py_DECREF(ids);
        Py_RETURN_NONE;
    }
    return ids;
}

static PyObject *take(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "take(array, row: int, count: int)");
        return NULL;
    }
    Py_ssize_t row = PyLong_AsSsize_t(args[1]), count = PyLong_AsSsize_t(args[2]);
    if ((row == -1 || count == -1) && PyErr_Occurred())
        return NULL;
    Py_buffer src;
    if (PyObject_GetBuffer(args[0], &src, PyBUF_C_CONTIGUOUS | PyBUF_ND) < 0)
        return NULL;
    PyObject *out = NULL;
    if (src.ndim < 2 || row < 0 || row >= src.shape[0] || count < 0 || count > src.shape[1])
        PyErr_Format(PyExc_ValueError, "take: no row %zd of %zd items in an array of %d dims", row, count, src.ndim);
    else {
        Py_ssize_t row_bytes = src.len / src.shape[0], item_bytes = src.shape[1] ? row_bytes / src.shape[1] : 0;
        out = PyBytes_FromStringAndSize((const char *)src.buf + row * row_bytes, count * item_bytes);
    }
    PyBuffer_Release(&src);
    return out;
}

static PyMethodDef methods[] = {
    {"noise", (PyCFunction)(void (*)(void))noise, METH_FASTCALL, "noise(seeds, out): numpy default_rng(seed) normals"},
    {"words", (PyCFunction)(void (*)(void))words, METH_FASTCALL,
     "words(prompt, first, later, head, tail, max_length): a plain prompt's ids from the word cache, or None"},
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL, "take(array, row, count): bytes of array[row, :count]"},
    {"tokens", (PyCFunction)(void (*)(void))tokens, METH_FASTCALL, "tokens(rows, ids, mask, length, pad_id)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hostpath", "a call's host-side steps in native code",
                                    -1, methods};

PyMODINIT_FUNC PyInit__hostpath(void) { return PyModule_Create(&module); }
