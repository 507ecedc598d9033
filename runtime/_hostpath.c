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
 *   gan_call(state, prompt, seed, num_images, output_type, start)
 *                       a whole gan call (Pipeline.__call__ with GanPipeline._generate's fused or cached path)
 *                       on ONNX Runtime CPU buffers: the argument checks' common case, the pipeline's lock, then
 *                       word ids, tokens, noise, run(binding), the text cache's update and the images, or (every
 *                       prompt cached) the cached states, noise, the generator's run and its image into pixels.
 *                       (pixels, record) or None where Python must serve it (any other argument, which Python
 *                       checks; a prompt not plain or with an unseen word; one truncated, which Python warns
 *                       about; no buffers yet for this batch and length). state: GanPipeline._native_state;
 *                       start: perf_counter_ns() at the call's start. With its steps in C the call touches far
 *                       less memory than in Python.
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

/* 0 where a call succeeded (its result dropped), -1 where it raised */
static int ok(PyObject *result) {
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
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

/* The clock of Python's perf_counter_ns (gan_call's record starts at a perf_counter_ns() reading) */
static long long clock_ns(void) {
    struct timespec ts;
#ifdef __APPLE__
    clock_gettime(CLOCK_UPTIME_RAW, &ts);  /* mach_absolute_time */
#else
    clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* GanPipeline._native_state: what gan_call needs, fixed when the pipeline is made */
enum { S_LOCK, S_MAX_BATCH, S_CACHE, S_CACHE_SIZE, S_TOKENIZER, S_FIRST, S_LATER, S_MAX_LENGTH, S_PAD_TO_LONGEST, S_PAD_ID,
       S_SETS, S_RUN, S_GEN_SETS, S_GEN_RUN, S_RANDBELOW, S_SIZE };
static PyObject *str_ends, *str_acquire, *str_release, *str_move_to_end, *str_fused, *str_cached;  /* interned */

/* A new reference to d[name], or NULL with KeyError. */
static PyObject *buffer(PyObject *d, const char *name) {
    PyObject *v = PyDict_Check(d) ? PyDict_GetItemString(d, name) : NULL;
    if (v == NULL)
        PyErr_Format(PyExc_KeyError, "gan_call: no buffer %s", name);
    Py_XINCREF(v);
    return v;
}

/* The text cache's update, as GanPipeline._remember makes it: a prompt already cached moves to the end; a new
 * one gets (a copy of its text states, its token count, False); past cache_size the oldest goes. */
static int remember(PyObject *cache, Py_ssize_t cache_size, PyObject *prompts, PyObject *rows, PyObject *states) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(prompts); i++) {
        PyObject *prompt = PyList_GET_ITEM(prompts, i);
        int cached = PyDict_Contains(cache, prompt);  /* an OrderedDict: a dict underneath */
        if (cached < 0)
            return -1;
        if (cached) {
            if (ok(PyObject_CallMethodOneArg(cache, str_move_to_end, prompt)) < 0)
                return -1;
            continue;
        }
        Py_ssize_t n = PyList_GET_SIZE(PyList_GET_ITEM(rows, i));
        PyObject *copied = row_copy(states, i, n);
        PyObject *entry = copied ? Py_BuildValue("(NnO)", copied, n, Py_False) : NULL;
        int stored = entry ? PyObject_SetItem(cache, prompt, entry) : -1;
        Py_XDECREF(entry);
        if (stored < 0)
            return -1;
        if (PyDict_GET_SIZE(cache) > cache_size && ok(PyObject_CallMethod(cache, "popitem", "O", Py_False)) < 0)
            return -1;
    }
    return 0;
}

/* The seeds' noise into the bound noise buffer, then run(binding): the stage stamps after each */
static int noise_then_run(PyObject *seeds, PyObject *noise_out, PyObject *run, PyObject *binding, long long *noised,
                          long long *ran) {
    PyObject *noise_args[2] = {seeds, noise_out};
    if (ok(noise(NULL, noise_args, 2)) < 0)
        return -1;
    *noised = clock_ns();
    if (ok(PyObject_CallOneArg(run, binding)) < 0)
        return -1;
    *ran = clock_ns();
    return 0;
}

/* The four stages' ns from the stamps at their starts (t[0..3]), the last ending now */
static void laps(long long times[4], const long long t[4]) {
    for (int k = 0; k < 3; k++)
        times[k] = t[k + 1] - t[k];
    times[3] = clock_ns() - t[3];
}

/* PromptTokenizer.length_for: the row length for prompts of these token counts, -1 with an exception */
static Py_ssize_t length_for(PyObject *state, Py_ssize_t longest, Py_ssize_t shortest) {
    Py_ssize_t max_length = PyLong_AsSsize_t(PyTuple_GET_ITEM(state, S_MAX_LENGTH));
    int dynamic = PyObject_IsTrue(PyTuple_GET_ITEM(state, S_PAD_TO_LONGEST));
    if (PyErr_Occurred() || dynamic < 0)
        return -1;
    return (!dynamic || shortest == 0) ? max_length : (longest < max_length ? longest : max_length);
}

/* A graph's (inputs, outputs, binding) for this batch and length (borrowed), or NULL: with an exception, or
 * none where no buffers are bound yet (the Python path makes them). */
static PyObject *bound_set(PyObject *sets, Py_ssize_t batch, Py_ssize_t length) {
    PyObject *key = Py_BuildValue("(nn)", batch, length);
    PyObject *found = key ? PyDict_GetItemWithError(sets, key) : NULL;
    Py_XDECREF(key);
    if (found != NULL && (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 3)) {
        PyErr_SetString(PyExc_TypeError, "gan_call: sets must map (batch, length) to (inputs, outputs, binding)");
        return NULL;
    }
    return found;
}

/* The fused graph's call (GanPipeline._generate's fused path) on ONNX Runtime CPU buffers: word ids, tokens,
 * noise, run(binding), the text cache's update, a copy of the images. 1 with *images, *length and the ns of
 * tokenize, noise, fused and output in times; 0 where the Python path must serve the call (a prompt not plain or
 * with an unseen word, one to truncate, no buffers yet for this batch and length); -1 with an exception. */
static int fused(PyObject *state, PyObject *prompts, PyObject *seeds, PyObject **images, Py_ssize_t *length,
                 long long times[4]) {
    long long t[4] = {clock_ns()}, pad_id = PyLong_AsLongLong(PyTuple_GET_ITEM(state, S_PAD_ID));
    Py_ssize_t cache_size = PyLong_AsSsize_t(PyTuple_GET_ITEM(state, S_CACHE_SIZE));
    PyObject *ends = PyErr_Occurred() ? NULL : PyObject_GetAttr(PyTuple_GET_ITEM(state, S_TOKENIZER), str_ends);
    if (ends == NULL)  /* (head ids, tail ids); None until the library taught them */
        return -1;
    int status = 0;
    Py_ssize_t batch = PyList_GET_SIZE(prompts), longest = 0, shortest = PY_SSIZE_T_MAX;
    PyObject *rows = PyList_New(batch);
    PyObject *ids = NULL, *mask = NULL, *noise_out = NULL, *states = NULL, *image = NULL;
    if (rows == NULL || !PyTuple_Check(ends) || PyTuple_GET_SIZE(ends) != 2) {
        status = rows == NULL ? -1 : 0;
        goto end;
    }
    for (Py_ssize_t i = 0; i < batch; i++) {
        PyObject *word_args[6] = {PyList_GET_ITEM(prompts, i), PyTuple_GET_ITEM(state, S_FIRST), PyTuple_GET_ITEM(state, S_LATER),
                                  PyTuple_GET_ITEM(ends, 0), PyTuple_GET_ITEM(ends, 1), PyTuple_GET_ITEM(state, S_MAX_LENGTH)};
        PyObject *row = words(NULL, word_args, 6);
        if (row == NULL) {
            status = -1;
            goto end;
        }
        PyList_SET_ITEM(rows, i, row);  /* rows owns it */
        if (row == Py_None)  /* not plain, a word not cached, or truncated: the Python path */
            goto end;
        Py_ssize_t n = PyList_GET_SIZE(row);
        longest = n > longest ? n : longest;
        shortest = n < shortest ? n : shortest;
    }
    status = -1;
    PyObject *found = (*length = length_for(state, longest, shortest)) < 0 ? NULL :
                      bound_set(PyTuple_GET_ITEM(state, S_SETS), batch, *length);
    if (found == NULL) {
        if (!PyErr_Occurred())
            status = 0;
        goto end;
    }
    PyObject *ins = PyTuple_GET_ITEM(found, 0), *outs = PyTuple_GET_ITEM(found, 1);
    if (!(ids = buffer(ins, "input_ids")) || !(mask = buffer(ins, "attention_mask")) || !(noise_out = buffer(ins, "noise")) ||
        !(states = buffer(outs, "text_states")) || !(image = buffer(outs, "pixels")) ||
        write_rows(rows, ids, mask, *length, pad_id) < 0)
        goto end;
    t[1] = clock_ns();
    if (noise_then_run(seeds, noise_out, PyTuple_GET_ITEM(state, S_RUN), PyTuple_GET_ITEM(found, 2), &t[2], &t[3]) < 0)
        goto end;
    PyObject *cache = PyTuple_GET_ITEM(state, S_CACHE);
    if (cache != Py_None && remember(cache, cache_size, prompts, rows, states) < 0)
        goto end;
    PyObject *copy_args[1] = {image};
    if (!(*images = copy(NULL, copy_args, 1)))
        goto end;
    laps(times, t);
    status = 1;
end:
    Py_DECREF(ends);
    Py_XDECREF(rows);
    Py_XDECREF(ids);
    Py_XDECREF(mask);
    Py_XDECREF(noise_out);
    Py_XDECREF(states);
    Py_XDECREF(image);
    return status;
}

/* The cached path (GanPipeline._generate's, every prompt's text states cached) on ONNX Runtime CPU buffers: the
 * entries moved to the cache's end, their states and mask into the generator's buffers, noise, run(binding), the
 * image into pixels. 1 with *images, *length and the ns of cache, noise, generator and output in times; 0 where
 * the Python path must serve it (a prompt that was truncated, which it warns about; no buffers yet). */
static int from_cache(PyObject *state, PyObject *prompts, PyObject *seeds, PyObject **images, Py_ssize_t *length,
                      long long times[4]) {
    long long t[4] = {clock_ns()};
    PyObject *cache = PyTuple_GET_ITEM(state, S_CACHE);
    Py_ssize_t batch = PyList_GET_SIZE(prompts), longest = 0, shortest = PY_SSIZE_T_MAX;
    PyObject *rows = PyList_New(batch), *states = NULL, *mask = NULL, *noise_out = NULL, *image = NULL;
    int status = rows == NULL ? -1 : 0;
    for (Py_ssize_t i = 0; status == 0 && i < batch; i++) {
        PyObject *entry = PyDict_GetItemWithError(cache, PyList_GET_ITEM(prompts, i));  /* (states, n, truncated) */
        if (entry == NULL || !PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3 || PyTuple_GET_ITEM(entry, 2) != Py_False) {
            status = PyErr_Occurred() ? -1 : 0;
            goto end;
        }
        Py_ssize_t n = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 1));
        if (n == -1 && PyErr_Occurred())
            status = -1;
        PyList_SET_ITEM(rows, i, Py_NewRef(PyTuple_GET_ITEM(entry, 0)));
        longest = n > longest ? n : longest;
        shortest = n < shortest ? n : shortest;
    }
    if (status < 0)
        goto end;
    status = -1;
    PyObject *found = (*length = length_for(state, longest, shortest)) < 0 ? NULL :
                      bound_set(PyTuple_GET_ITEM(state, S_GEN_SETS), batch, *length);
    if (found == NULL) {
        if (!PyErr_Occurred())
            status = 0;
        goto end;
    }
    PyObject *ins = PyTuple_GET_ITEM(found, 0), *outs = PyTuple_GET_ITEM(found, 1);
    if (!(states = buffer(ins, "text_states")) || !(mask = buffer(ins, "attention_mask")) || !(noise_out = buffer(ins, "noise")) ||
        !(image = buffer(outs, "image")))
        goto end;
    for (Py_ssize_t i = 0; i < batch; i++)  /* most recently used last, as Python's path leaves them */
        if (ok(PyObject_CallMethodOneArg(cache, str_move_to_end, PyList_GET_ITEM(prompts, i))) < 0)
            goto end;
    PyObject *state_args[3] = {rows, states, mask};
    if (ok(states_into(NULL, state_args, 3)) < 0)
        goto end;
    t[1] = clock_ns();
    if (noise_then_run(seeds, noise_out, PyTuple_GET_ITEM(state, S_GEN_RUN), PyTuple_GET_ITEM(found, 2), &t[2], &t[3]) < 0)
        goto end;
    PyObject *pixel_args[1] = {image};
    if (!(*images = pixels(NULL, pixel_args, 1)))
        goto end;
    if (*images == Py_None) {  /* the generator's bound image is float32 (N, C, H, W) */
        Py_CLEAR(*images);
        PyErr_SetString(PyExc_TypeError, "gan_call: the generator's image buffer is not C-contiguous float32 of 4 dims");
        goto end;
    }
    laps(times, t);
    status = 1;
end:
    Py_XDECREF(rows);
    Py_XDECREF(states);
    Py_XDECREF(mask);
    Py_XDECREF(noise_out);
    Py_XDECREF(image);
    return status;
}

/* normalize_prompts' common case, each prompt repeated num_images times: a str, or a non-empty list or tuple of
 * str (their text is checked by words(): only plain ASCII prompts go on), at most max_batch images. NULL with no
 * exception: anything else, for Python to check (and refuse with its message). */
static PyObject *call_prompts(PyObject *prompt, Py_ssize_t num_images, Py_ssize_t max_batch) {
    int one = PyUnicode_CheckExact(prompt);
    if (!one && !PyList_CheckExact(prompt) && !PyTuple_CheckExact(prompt))
        return NULL;
    Py_ssize_t count = one ? 1 : PySequence_Fast_GET_SIZE(prompt);
    if (count == 0 || count > max_batch / num_images)
        return NULL;
    PyObject *prompts = PyList_New(count * num_images);
    for (Py_ssize_t i = 0; prompts != NULL && i < count; i++) {
        PyObject *p = one ? prompt : PySequence_Fast_GET_ITEM(prompt, i);
        if (!PyUnicode_CheckExact(p)) {
            Py_CLEAR(prompts);
            break;
        }
        for (Py_ssize_t k = 0; k < num_images; k++)
            PyList_SET_ITEM(prompts, i * num_images + k, Py_NewRef(p));
    }
    return prompts;
}

/* expand_seeds' common cases: None (a random first seed from randbelow), an int, or a list or tuple of one int
 * per image, every seed in [0, 2**64). NULL with no exception: anything else, for Python to check. */
static PyObject *call_seeds(PyObject *seed, Py_ssize_t total, PyObject *randbelow) {
    PyObject *seeds = NULL;
    if (PyList_CheckExact(seed) || PyTuple_CheckExact(seed)) {
        if (PySequence_Fast_GET_SIZE(seed) != total || !(seeds = PyList_New(total)))
            return NULL;
        for (Py_ssize_t i = 0; i < total; i++) {
            PyObject *s = PySequence_Fast_GET_ITEM(seed, i);
            if (!PyLong_CheckExact(s) || (PyLong_AsUnsignedLongLong(s) == (unsigned long long)-1 && PyErr_Occurred())) {
                PyErr_Clear();  /* negative or past 2**64 (no other error comes from an int) */
                Py_DECREF(seeds);
                return NULL;
            }
            PyList_SET_ITEM(seeds, i, Py_NewRef(s));
        }
        return seeds;
    }
    PyObject *first_obj;
    if (seed == Py_None) {  /* secrets.randbelow(2**64 - total), as expand_seeds draws it */
        PyObject *limit = PyLong_FromUnsignedLongLong((unsigned long long)0 - (unsigned long long)total);
        first_obj = limit ? PyObject_CallOneArg(randbelow, limit) : NULL;
        Py_XDECREF(limit);
        if (first_obj == NULL)
            return NULL;
    } else if (PyLong_CheckExact(seed)) {
        first_obj = Py_NewRef(seed);
    } else {
        return NULL;
    }
    unsigned long long first = PyLong_AsUnsignedLongLong(first_obj);
    Py_DECREF(first_obj);
    if ((first == (unsigned long long)-1 && PyErr_Occurred()) || (unsigned long long)(total - 1) > ~0ULL - first) {
        PyErr_Clear();  /* out of range, or the images' seeds would run past 2**64 */
        return NULL;
    }
    if (!(seeds = PyList_New(total)))
        return NULL;
    for (Py_ssize_t i = 0; i < total; i++) {
        PyObject *s = PyLong_FromUnsignedLongLong(first + (unsigned long long)i);
        if (s == NULL) {
            Py_DECREF(seeds);
            return NULL;
        }
        PyList_SET_ITEM(seeds, i, s);
    }
    return seeds;
}

static PyObject *gan_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyTuple_Check(args[0]) || PyTuple_GET_SIZE(args[0]) != S_SIZE) {
        PyErr_SetString(PyExc_TypeError, "gan_call(state, prompt, seed, num_images, output_type, start)");
        return NULL;
    }
    PyObject *state = args[0], *lock = PyTuple_GET_ITEM(state, S_LOCK), *cache = PyTuple_GET_ITEM(state, S_CACHE);
    long long start = PyLong_AsLongLong(args[5]);
    Py_ssize_t max_batch = PyLong_AsSsize_t(PyTuple_GET_ITEM(state, S_MAX_BATCH));
    if (PyErr_Occurred())
        return NULL;
    /* Pipeline.__call__'s argument checks, for the common case; anything else goes to Python's checks */
    Py_ssize_t num_images = PyLong_CheckExact(args[3]) ? PyLong_AsSsize_t(args[3]) : -1;  /* not bool, not numpy */
    PyErr_Clear();
    PyObject *output_type = args[4];
    if (num_images < 1 || num_images > max_batch || !PyUnicode_CheckExact(output_type) ||
        (PyUnicode_CompareWithASCIIString(output_type, "np") && PyUnicode_CompareWithASCIIString(output_type, "pil")))
        Py_RETURN_NONE;
    PyObject *prompts = call_prompts(args[1], num_images, max_batch), *seeds = NULL, *pixels = NULL, *result = NULL;
    if (prompts == NULL || !(seeds = call_seeds(args[2], PyList_GET_SIZE(prompts), PyTuple_GET_ITEM(state, S_RANDBELOW)))) {
        Py_XDECREF(prompts);
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    /* the pipeline's lock, as Python's `with self._lock` takes it (acquire waits without the GIL) */
    if (ok(PyObject_CallMethodNoArgs(lock, str_acquire)) < 0)
        goto end;
    long long checked = clock_ns(), times[4] = {0};
    Py_ssize_t length = 0, batch = PyList_GET_SIZE(prompts), cached = 0;
    int served = 0;
    /* every prompt's text states cached (auto mode, a cache of one or more): the cached path */
    if (cache != Py_None && PyLong_AsSsize_t(PyTuple_GET_ITEM(state, S_CACHE_SIZE)) > 0)
        for (Py_ssize_t i = 0; i < batch && cached == i; i++)
            cached += PyDict_Contains(cache, PyList_GET_ITEM(prompts, i)) == 1;
    PyObject *path = cached == batch ? str_cached : str_fused;
    if (PyErr_Occurred())
        served = -1;
    else
        served = (cached == batch ? from_cache : fused)(state, prompts, seeds, &pixels, &length, times);
    PyObject *type, *value, *trace;
    PyErr_Fetch(&type, &value, &trace);  /* release the lock whatever happened */
    if (ok(PyObject_CallMethodNoArgs(lock, str_release)) < 0) {
        Py_XDECREF(type), Py_XDECREF(value), Py_XDECREF(trace);
        goto end;
    }
    PyErr_Restore(type, value, trace);
    if (served == 1)  /* (pixels, (path, seeds, length, ns of checks, its four stages, the whole call)) */
        result = Py_BuildValue("(O(OOnLLLLLL))", pixels, path, seeds, length, checked - start, times[0], times[1], times[2],
                               times[3], clock_ns() - start);
    else if (served == 0)
        result = Py_NewRef(Py_None);
end:
    Py_DECREF(prompts);
    Py_DECREF(seeds);
    Py_XDECREF(pixels);
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
    {"gan_call", (PyCFunction)(void (*)(void))gan_call, METH_FASTCALL,
     "gan_call(state, prompt, seed, num_images, output_type, start): a whole gan call, or None for Python to serve"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hostpath", "a call's host-side steps in native code",
                                    -1, methods};

PyMODINIT_FUNC PyInit__hostpath(void) {
    import_array();  /* an ImportError where this numpy's C API does not match: the runtime then runs its Python path */
    if (!(str_ends = PyUnicode_InternFromString("_ends")) || !(str_acquire = PyUnicode_InternFromString("acquire")) ||
        !(str_release = PyUnicode_InternFromString("release")) || !(str_move_to_end = PyUnicode_InternFromString("move_to_end")) ||
        !(str_fused = PyUnicode_InternFromString("fused")) || !(str_cached = PyUnicode_InternFromString("cached")))
        return NULL;
    return PyModule_Create(&module);
}
