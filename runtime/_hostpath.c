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
 *   fused_call(prompts, seeds, first, later, head, tail, max_length, pad_to_longest, pad_id, sets, run,
 *              cache, cache_size)
 *                       a whole gan call on the fused graph (GanPipeline._generate's fused path), on ONNX
 *                       Runtime CPU buffers: word ids, tokens, noise, run(binding), the text cache's update,
 *                       the images; (pixels, length, and the ns of tokenize, noise, fused, output), or None
 *                       where the Python path must serve it (a prompt not plain or with an unseen word, a
 *                       prompt to truncate, no buffers yet for this batch and length). With its steps in C the
 *                       call touches far less memory than the same orchestration in Python.
 *
 * The pure-Python path in pipeline.py / tokenize.py gives the same values (tested against each other);
 * it runs where this module could not be built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <time.h>
#include <string.h>

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
    npy_intp id_items, mask_items;
    int id_type, mask_type;
    char *ids = array_data(args[1], NPY_INT64, NPY_INT32, &id_type, &id_items, "tokens ids");
    char *mask = ids ? array_data(args[2], NPY_INT64, NPY_INT32, &mask_type, &mask_items, "tokens mask") : NULL;
    if (mask == NULL)
        return NULL;
    if (length < 0 || id_items != count * length || mask_items != id_items) {
        PyErr_Format(PyExc_ValueError, "tokens: arrays of %zd and %zd ids for %zd rows of %zd", (Py_ssize_t)id_items,
                     (Py_ssize_t)mask_items, count, length);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = PyList_GET_ITEM(args[0], i);
        if (!PyList_Check(row) || PyList_GET_SIZE(row) > length) {
            PyErr_Format(PyExc_ValueError, "tokens: row %zd is not a list of at most %zd ids", i, length);
            return NULL;
        }
        Py_ssize_t n = PyList_GET_SIZE(row), k;
        for (k = 0; k < length; k++) {
            long long v = pad_id;
            if (k < n) {
                v = PyLong_AsLongLong(PyList_GET_ITEM(row, k));
                if (v == -1 && PyErr_Occurred())
                    return NULL;
            }
            store(ids, id_type, i * length + k, v);
            store(mask, mask_type, i * length + k, k < n);
        }
    }
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

static PyObject *copy_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy_rows(array, row: int, count: int)");
        return NULL;
    }
    PyArrayObject *src = contiguous(args[0], 2, "copy_rows");
    Py_ssize_t row = PyLong_AsSsize_t(args[1]), count = PyLong_AsSsize_t(args[2]);
    if (src == NULL || ((row == -1 || count == -1) && PyErr_Occurred()))
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
        for (npy_intp k = 0; k < c; k++)
            for (npy_intp i = 0; i < hw; i++) {
                /* numpy's float32 steps: (x + 1) * 127.5, clip to [0, 255], round half to even */
                float v = (in[(b * c + k) * hw + i] + 1.0f) * 127.5f;
                v = v > 0.0f ? (v < 255.0f ? v : 255.0f) : 0.0f;  /* NaN -> 0 */
                px[(b * hw + i) * c + k] = (uint8_t)nearbyintf(v);
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

static long long clock_ns(void) {  /* CLOCK_MONOTONIC: the clock of Python's perf_counter_ns on Linux */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A new reference to d[name], or NULL with KeyError. */
static PyObject *buffer(PyObject *d, const char *name) {
    PyObject *v = PyDict_Check(d) ? PyDict_GetItemString(d, name) : NULL;
    if (v == NULL)
        PyErr_Format(PyExc_KeyError, "fused_call: no buffer %s", name);
    Py_XINCREF(v);
    return v;
}

/* The text cache's update, as GanPipeline._remember makes it: a prompt already cached moves to the end; a new
 * one gets (a copy of its text states, its token count, False); past cache_size the oldest goes. */
static int remember(PyObject *cache, Py_ssize_t cache_size, PyObject *prompts, PyObject *rows, PyObject *states) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(prompts); i++) {
        PyObject *prompt = PyList_GET_ITEM(prompts, i), *done;
        int cached = PySequence_Contains(cache, prompt);
        if (cached < 0)
            return -1;
        if (cached) {
            done = PyObject_CallMethod(cache, "move_to_end", "O", prompt);
        } else {
            Py_ssize_t n = PyList_GET_SIZE(PyList_GET_ITEM(rows, i));
            PyObject *row_i = PyLong_FromSsize_t(i), *count = PyLong_FromSsize_t(n);
            PyObject *copy_args[3] = {states, row_i, count};
            PyObject *copied = row_i && count ? copy_rows(NULL, copy_args, 3) : NULL;
            Py_XDECREF(row_i);
            Py_XDECREF(count);
            PyObject *entry = copied ? Py_BuildValue("(NnO)", copied, n, Py_False) : NULL;
            if (entry == NULL || PyObject_SetItem(cache, prompt, entry) < 0) {
                Py_XDECREF(entry);
                return -1;
            }
            Py_DECREF(entry);
            Py_ssize_t size = PyObject_Length(cache);
            if (size < 0)
                return -1;
            done = size > cache_size ? PyObject_CallMethod(cache, "popitem", "O", Py_False) : Py_NewRef(Py_None);
        }
        if (done == NULL)
            return -1;
        Py_DECREF(done);
    }
    return 0;
}

static PyObject *fused_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 13 || !PyList_Check(args[0]) || !PyList_Check(args[1]) || !PyDict_Check(args[9])) {
        PyErr_SetString(PyExc_TypeError, "fused_call(prompts, seeds, first, later, head, tail, max_length, "
                        "pad_to_longest, pad_id, sets, run, cache, cache_size)");
        return NULL;
    }
    long long t0 = clock_ns(), t1, t2, t3, t4;
    PyObject *prompts = args[0], *seeds = args[1], *sets = args[9], *run = args[10], *cache = args[11];
    Py_ssize_t max_length = PyLong_AsSsize_t(args[6]), cache_size = PyLong_AsSsize_t(args[12]);
    int dynamic = PyObject_IsTrue(args[7]);
    if (PyErr_Occurred() || dynamic < 0)
        return NULL;
    Py_ssize_t batch = PyList_GET_SIZE(prompts), longest = 0, shortest = PY_SSIZE_T_MAX;
    PyObject *rows = PyList_New(batch), *result = NULL, *pixels = NULL, *done = NULL, *length_obj = NULL;
    PyObject *ids = NULL, *mask = NULL, *noise_out = NULL, *states = NULL, *image = NULL;
    if (rows == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < batch; i++) {
        PyObject *word_args[6] = {PyList_GET_ITEM(prompts, i), args[2], args[3], args[4], args[5], args[6]};
        PyObject *row = words(NULL, word_args, 6);
        if (row == NULL)
            goto end;
        PyList_SET_ITEM(rows, i, row);  /* rows owns it */
        if (row == Py_None) {  /* not plain, a word not cached, or truncated: the Python path */
            result = Py_NewRef(Py_None);
            goto end;
        }
        Py_ssize_t n = PyList_GET_SIZE(row);
        longest = n > longest ? n : longest;
        shortest = n < shortest ? n : shortest;
    }
    /* PromptTokenizer.length_for */
    Py_ssize_t length = (!dynamic || shortest == 0) ? max_length : (longest < max_length ? longest : max_length);
    PyObject *key = Py_BuildValue("(nn)", batch, length);
    PyObject *found = key ? PyDict_GetItemWithError(sets, key) : NULL;  /* borrowed */
    Py_XDECREF(key);
    if (found == NULL) {
        if (!PyErr_Occurred())
            result = Py_NewRef(Py_None);  /* no buffers for this batch and length yet: the Python path makes them */
        goto end;
    }
    if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 3) {
        PyErr_SetString(PyExc_TypeError, "fused_call: sets must map (batch, length) to (inputs, outputs, binding)");
        goto end;
    }
    PyObject *ins = PyTuple_GET_ITEM(found, 0), *outs = PyTuple_GET_ITEM(found, 1);
    if (!(ids = buffer(ins, "input_ids")) || !(mask = buffer(ins, "attention_mask")) || !(noise_out = buffer(ins, "noise")) ||
        !(states = buffer(outs, "text_states")) || !(image = buffer(outs, "pixels")) || !(length_obj = PyLong_FromSsize_t(length)))
        goto end;
    PyObject *token_args[5] = {rows, ids, mask, length_obj, args[8]};
    if (!(done = tokens(NULL, token_args, 5)))
        goto end;
    Py_CLEAR(done);
    t1 = clock_ns();
    PyObject *noise_args[2] = {seeds, noise_out};
    if (!(done = noise(NULL, noise_args, 2)))
        goto end;
    Py_CLEAR(done);
    t2 = clock_ns();
    if (!(done = PyObject_CallOneArg(run, PyTuple_GET_ITEM(found, 2))))
        goto end;
    Py_CLEAR(done);
    t3 = clock_ns();
    if (cache != Py_None && remember(cache, cache_size, prompts, rows, states) < 0)
        goto end;
    PyObject *copy_args[1] = {image};
    if (!(pixels = copy(NULL, copy_args, 1)))
        goto end;
    t4 = clock_ns();
    result = Py_BuildValue("(NnLLLL)", pixels, length, t1 - t0, t2 - t1, t3 - t2, t4 - t3);
end:
    Py_DECREF(rows);
    Py_XDECREF(ids);
    Py_XDECREF(mask);
    Py_XDECREF(noise_out);
    Py_XDECREF(states);
    Py_XDECREF(image);
    Py_XDECREF(length_obj);
    return result;
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
    {"fused_call", (PyCFunction)(void (*)(void))fused_call, METH_FASTCALL,
     "fused_call(...): a gan call on the fused graph, or None where the Python path must serve it"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hostpath", "a call's host-side steps in native code",
                                    -1, methods};

PyMODINIT_FUNC PyInit__hostpath(void) {
    import_array();  /* an ImportError where this numpy's C API does not match: the runtime then runs its Python path */
    return PyModule_Create(&module);
}
