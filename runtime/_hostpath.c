/* edgegen.runtime._hostpath: a call's host-side steps in native code.
 *
 * Right after an engine run has evicted the CPU caches, every Python or numpy operation a call makes
 * costs 5-16x what it costs warm (`python -m benchmarks.host_steps`): the interpreter and numpy touch
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
 *                       rows (a list of lists of ints) written right-padded into the int64 (or int32)
 *                       arrays ids and mask, (len(rows), length) each: ids[i] = row, then pad_id; mask[i] = 1s, then 0s.
 *   copy(array), copy_rows(array, row, count)
 *                       a new array equal to array (C-contiguous), or to array[row, :count] (two or more
 *                       dims): the call's images, and a prompt's text states for the text cache. numpy's own
 *                       copy goes through its general assignment machinery.
 *   states_into(rows, states, mask)
 *                       the cached path's inputs: rows[i] (a prompt's text states, (n, width) float32) into
 *                       states[i, :n], zeros after; mask[i] 1s for n, then 0s
 *   pixels(image)       a generator's NCHW float32 image in [-1, 1] -> a new NHWC uint8 array, with
 *                       pipeline.to_pixels's arithmetic (the fused graph's post-processing); None for
 *                       anything but a C-contiguous float32 array of four dims
 *
 * Each function is stateless and has a numpy twin in native.py with the same values (tested against each
 * other); the twins run where this module could not be built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <float.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include "numpy/arrayobject.h"
#include "numpy/random/bitgen.h"

#ifndef __SIZEOF_INT128__
#error "needs a compiler with 128-bit integers (gcc, clang); edgegen then runs its pure-Python host path"
#endif

/* from numpy/random/distributions.h, which pulls in numpy's whole C API: the one function used */
extern void random_standard_normal_fill_f(bitgen_t *bitgen_state, npy_intp cnt, float *out);

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

/* A C-contiguous, writeable numpy array of dtype ``type`` (or ``alt``, where not -1): its data, its item count
 * in *items, and its dtype in *found. Only the array's header is read (numpy's buffer protocol would build a
 * format string and look up its cache on each call). */
static void *array_data(PyObject *obj, int type, int alt, int *found, npy_intp *items, const char *what) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy array, got %s", what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    *found = PyArray_TYPE(arr);
    if (*found != type && *found != alt) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s, got %s", what, type == NPY_FLOAT32 ? "float32" : "int64 or int32",
                     PyArray_DESCR(arr)->typeobj->tp_name);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(arr) || !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "%s: the array must be C-contiguous and writeable", what);
        return NULL;
    }
    *items = PyArray_SIZE(arr);
    return PyArray_DATA(arr);
}

static PyObject *noise(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "noise(seeds: list[int], out: float32 array)");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(args[0]);
    npy_intp items;
    int type;
    float *out = array_data(args[1], NPY_FLOAT32, -1, &type, &items, "noise out");
    if (out == NULL)
        return NULL;
    if (count == 0 || items % count) {
        PyErr_Format(PyExc_ValueError, "noise: %zd values do not split into %zd seeds", (Py_ssize_t)items, count);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long seed = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(args[0], i));  /* raises past 2**64 */
        if (seed == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
        pcg64 state;
        pcg64_seed(&state, seed);
        bitgen_t bits = {&state, pcg64_next64, pcg64_next32, pcg64_next_double, pcg64_next64};
        random_standard_normal_fill_f(&bits, items / count, out + i * (items / count));
    }
    Py_RETURN_NONE;
}

static inline void store(char *base, int type, Py_ssize_t index, long long value) {
    if (type == NPY_INT32)
        ((int32_t *)base)[index] = (int32_t)value;
    else
        ((int64_t *)base)[index] = value;
}

/* rows (a list of lists of ints) right-padded into the int64 (or int32) arrays ids and mask; -1 with an exception */
static int write_rows(PyObject *rows, PyObject *ids_obj, PyObject *mask_obj, Py_ssize_t length, long long pad_id) {
    Py_ssize_t count = PyList_GET_SIZE(rows);
    npy_intp id_items, mask_items;
    int id_type, mask_type;
    char *ids = array_data(ids_obj, NPY_INT64, NPY_INT32, &id_type, &id_items, "tokens ids");
    char *mask = ids ? array_data(mask_obj, NPY_INT64, NPY_INT32, &mask_type, &mask_items, "tokens mask") : NULL;
    if (mask == NULL)
        return -1;
    if (length < 0 || id_items != count * length || mask_items != id_items) {
        PyErr_Format(PyExc_ValueError, "tokens: arrays of %zd and %zd ids for %zd rows of %zd", (Py_ssize_t)id_items,
                     (Py_ssize_t)mask_items, count, length);
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        if (!PyList_Check(row) || PyList_GET_SIZE(row) > length) {
            PyErr_Format(PyExc_ValueError, "tokens: row %zd is not a list of at most %zd ids", i, length);
            return -1;
        }
        Py_ssize_t n = PyList_GET_SIZE(row), k;
        for (k = 0; k < length; k++) {
            long long v = pad_id;
            if (k < n) {
                v = PyLong_AsLongLong(PyList_GET_ITEM(row, k));
                if (v == -1 && PyErr_Occurred())
                    return -1;
            }
            store(ids, id_type, i * length + k, v);
            store(mask, mask_type, i * length + k, k < n);
        }
    }
    return 0;
}

static PyObject *tokens(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "tokens(rows: list[list[int]], ids, mask, length: int, pad_id: int)");
        return NULL;
    }
    Py_ssize_t length = PyLong_AsSsize_t(args[3]);
    long long pad_id = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred() || write_rows(args[0], args[1], args[2], length, pad_id) < 0)
        return NULL;
    Py_RETURN_NONE;
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

/* A new array of src's dtype and the given shape, filled from ``from`` (within src's data). */
static PyObject *new_copy(PyArrayObject *src, int nd, npy_intp *dims, const char *from) {
    PyArray_Descr *descr = PyArray_DESCR(src);
    Py_INCREF(descr);  /* NewFromDescr steals it */
    PyObject *out = PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, NULL, NULL, 0, NULL);
    if (out != NULL)
        memcpy(PyArray_DATA((PyArrayObject *)out), from, (size_t)PyArray_NBYTES((PyArrayObject *)out));
    return out;
}

static PyArrayObject *contiguous(PyObject *obj, int min_dims, const char *what) {
    if (!PyArray_Check(obj) || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj) || PyArray_NDIM((PyArrayObject *)obj) < min_dims) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous numpy array of %d or more dims", what, min_dims);
        return NULL;
    }
    return (PyArrayObject *)obj;
}

static PyObject *copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "copy(array)");
        return NULL;
    }
    PyArrayObject *src = contiguous(args[0], 0, "copy");
    return src == NULL ? NULL : new_copy(src, PyArray_NDIM(src), PyArray_DIMS(src), PyArray_BYTES(src));
}

/* A new array equal to array[row, :count] (two or more dims), or NULL with an exception */
static PyObject *row_copy(PyObject *array, Py_ssize_t row, Py_ssize_t count) {
    PyArrayObject *src = contiguous(array, 2, "copy_rows");
    if (src == NULL)
        return NULL;
    int nd = PyArray_NDIM(src);
    npy_intp *shape = PyArray_DIMS(src), dims[NPY_MAXDIMS];
    if (row < 0 || row >= shape[0] || count < 0 || count > shape[1]) {
        PyErr_Format(PyExc_ValueError, "copy_rows: no row %zd of %zd items in an array of shape[:2] (%zd, %zd)", row,
                     count, (Py_ssize_t)shape[0], (Py_ssize_t)shape[1]);
        return NULL;
    }
    dims[0] = count;
    for (int k = 2; k < nd; k++)
        dims[k - 1] = shape[k];
    return new_copy(src, nd - 1, dims, PyArray_BYTES(src) + row * (PyArray_NBYTES(src) / shape[0]));
}

static PyObject *copy_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy_rows(array, row: int, count: int)");
        return NULL;
    }
    Py_ssize_t row = PyLong_AsSsize_t(args[1]), count = PyLong_AsSsize_t(args[2]);
    if ((row == -1 || count == -1) && PyErr_Occurred())
        return NULL;
    return row_copy(args[0], row, count);
}

/* Round half to even for 0 <= v <= 255, as np.rint: adding and taking away 2**23 leaves an integer rounded in the
 * default mode (to nearest, ties to even). nearbyintf is a libm call per value on baseline x86-64 (no SSE4.1). */
#if FLT_EVAL_METHOD == 0
static inline float round_even(float v) { return (v + 8388608.0f) - 8388608.0f; }
#else
#define round_even nearbyintf  /* float arithmetic in wider registers (x87): the trick would not hold */
#endif

static PyObject *pixels(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "pixels(image: float32 array (N, C, H, W))");
        return NULL;
    }
    PyArrayObject *src = (PyArrayObject *)args[0];
    if (!PyArray_Check(args[0]) || !PyArray_IS_C_CONTIGUOUS(src) || PyArray_NDIM(src) != 4 || PyArray_TYPE(src) != NPY_FLOAT32)
        Py_RETURN_NONE;  /* not what this loop reads: numpy's path converts it */
    npy_intp *shape = PyArray_DIMS(src);
    npy_intp n = shape[0], c = shape[1], hw = shape[2] * shape[3], dims[4] = {shape[0], shape[2], shape[3], shape[1]};
    PyObject *out = PyArray_SimpleNew(4, dims, NPY_UINT8);
    if (out == NULL)
        return NULL;
    const float *in = (const float *)PyArray_DATA(src);
    uint8_t *px = (uint8_t *)PyArray_DATA((PyArrayObject *)out);
    for (npy_intp b = 0; b < n; b++)
        for (npy_intp k = 0; k < c; k++) {
            const float *plane = in + (b * c + k) * hw;
            uint8_t *dst = px + b * hw * c + k;
            for (npy_intp i = 0; i < hw; i++) {
                /* numpy's float32 steps: (x + 1) * 127.5, clip to [0, 255], round half to even */
                float v = (plane[i] + 1.0f) * 127.5f;
                v = v > 0.0f ? (v < 255.0f ? v : 255.0f) : 0.0f;  /* NaN -> 0 */
                dst[i * c] = (uint8_t)round_even(v);
            }
        }
    return out;
}

static PyObject *states_into(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "states_into(rows: list of float32 arrays, states, mask)");
        return NULL;
    }
    npy_intp state_items, mask_items;
    int state_type, mask_type;
    char *states = array_data(args[1], NPY_FLOAT32, -1, &state_type, &state_items, "states_into states");
    char *mask = states ? array_data(args[2], NPY_INT64, NPY_INT32, &mask_type, &mask_items, "states_into mask") : NULL;
    if (mask == NULL)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(args[0]);
    npy_intp *shape = PyArray_DIMS((PyArrayObject *)args[1]);
    if (PyArray_NDIM((PyArrayObject *)args[1]) != 3 || shape[0] != count || mask_items != shape[0] * shape[1]) {
        PyErr_Format(PyExc_ValueError, "states_into: %zd rows for states of %d dims and a mask of %zd items", count,
                     PyArray_NDIM((PyArrayObject *)args[1]), (Py_ssize_t)mask_items);
        return NULL;
    }
    npy_intp length = shape[1], width = shape[2];
    for (Py_ssize_t i = 0; i < count; i++) {
        PyArrayObject *row = (PyArrayObject *)PyList_GET_ITEM(args[0], i);
        if (!PyArray_Check((PyObject *)row) || PyArray_TYPE(row) != NPY_FLOAT32 || !PyArray_IS_C_CONTIGUOUS(row) ||
            PyArray_NDIM(row) != 2 || PyArray_DIMS(row)[1] != width || PyArray_DIMS(row)[0] > length) {
            PyErr_Format(PyExc_ValueError, "states_into: row %zd is not a C-contiguous float32 (n <= %zd, %zd) array", i,
                         (Py_ssize_t)length, (Py_ssize_t)width);
            return NULL;
        }
        npy_intp n = PyArray_DIMS(row)[0];
        float *dst = (float *)states + i * length * width;
        memcpy(dst, PyArray_DATA(row), (size_t)(n * width) * sizeof(float));
        memset(dst + n * width, 0, (size_t)((length - n) * width) * sizeof(float));
        for (npy_intp k = 0; k < length; k++)
            store(mask, mask_type, i * length + k, k < n);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"noise", (PyCFunction)(void (*)(void))noise, METH_FASTCALL, "noise(seeds, out): numpy default_rng(seed) normals"},
    {"words", (PyCFunction)(void (*)(void))words, METH_FASTCALL,
     "words(prompt, first, later, head, tail, max_length): a plain prompt's ids from the word cache, or None"},
    {"tokens", (PyCFunction)(void (*)(void))tokens, METH_FASTCALL, "tokens(rows, ids, mask, length, pad_id)"},
    {"copy", (PyCFunction)(void (*)(void))copy, METH_FASTCALL, "copy(array): a copy of a C-contiguous array"},
    {"copy_rows", (PyCFunction)(void (*)(void))copy_rows, METH_FASTCALL,
     "copy_rows(array, row, count): a copy of array[row, :count]"},
    {"states_into", (PyCFunction)(void (*)(void))states_into, METH_FASTCALL,
     "states_into(rows, states, mask): cached text states, zero-padded, and their mask into bound buffers"},
    {"pixels", (PyCFunction)(void (*)(void))pixels, METH_FASTCALL, "pixels(image): NCHW float32 in [-1, 1] -> NHWC uint8"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hostpath", "a call's host-side steps in native code",
                                    -1, methods};

PyMODINIT_FUNC PyInit__hostpath(void) {
    import_array();  /* an ImportError where this numpy's C API does not match: the runtime then runs its Python path */
    return PyModule_Create(&module);
}
