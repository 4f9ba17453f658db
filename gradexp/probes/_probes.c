/* gradexp's probe kernel: every statistic a logged step takes, in one pass over each tensor.

   Built when the package is installed (setup.py: an optional extension, gradexp.probes._kernel) and
   loaded with ctypes by gradexp/probes/reduce.py; no torch headers, and of Python's only what makes
   the file an importable extension module. On the CPU the torch version of these statistics
   costs one op per statistic: a copy to stack the layers, then five passes over the stack, each op
   with its dispatch cost; run right after backward, with cold caches, that was over half of a
   logged step. Here each tensor is read once, and the sums are kept in double precision, so that
   no gradient norm loses elements to float32 underflow; the activations are summed around a pivot
   (the layer's first value), so that the std of a layer whose spread is tiny beside its mean (a
   saturated sigmoid layer, every value near 1) does not cancel in E[h^2] - E[h]^2.

   The activation codes and the derivatives must match gradexp/activations.py (DERIVATIVES), whose
   constants (LEAKY_SLOPE, SELU_SCALE, SELU_ALPHA) come in as arguments; the tests compare this kernel
   with the torch version and with autograd for every activation. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

enum { SIGMOID, TANH, RELU, LEAKY_RELU, ELU, GELU, SELU, SOFTSIGN, IDENTITY };

/* phi' constants, from gradexp/activations.py: the negative slope of leaky_relu, SELU's scale and
   scale * alpha */
typedef struct { double leaky_slope, selu_scale, selu_scale_alpha; } constants;

/* One hidden layer, (batch, units) row-major: the pivot p = h[0], sum (h - p), sum (h - p)^2,
   sum phi'(a), and the number of units whose largest |phi'(a)| over the batch is below `flat` (a
   NaN phi' makes its unit's largest NaN: not flat, as torch's amax). DERIV is phi' of x = h (or
   y = a). */
#define LAYER(DERIV)                                                      \
    for (int64_t b = 0; b < batch; b++) {                                 \
        const float *hr = h + b * units, *ar = a + b * units;             \
        _Pragma("omp simd reduction(+:s, s2, ds)")                        \
        for (int64_t u = 0; u < units; u++) {                             \
            float x = hr[u], y = ar[u];                                   \
            (void)y;                                                      \
            double d = (DERIV), c = (double)x - pivot;                    \
            s += c;                                                       \
            s2 += c * c;                                                  \
            ds += d;                                                      \
            double m = fabs(d);                                           \
            steepest[u] = m > steepest[u] || m != m ? m : steepest[u];    \
        }                                                                 \
    }

static void layer(const float *h, const float *a, int64_t batch, int64_t units, int activation,
                  double flat, const constants *k, double *steepest, double *out) {
    const double leaky = k->leaky_slope, selu_scale = k->selu_scale, selu_scale_alpha = k->selu_scale_alpha;
    double s = 0, s2 = 0, ds = 0, pivot = h[0];
    if (a == NULL) a = h;
    for (int64_t u = 0; u < units; u++) steepest[u] = 0;
    switch (activation) {
    case SIGMOID: LAYER((double)x * (1.0 - (double)x)); break;
    case TANH: LAYER(1.0 - (double)x * x); break;
    case RELU: LAYER(x > 0.0f ? 1.0 : 0.0); break;
    case LEAKY_RELU: LAYER(x > 0.0f ? 1.0 : leaky); break;
    case ELU: LAYER(x > 0.0f ? 1.0 : (double)x + 1.0); break;
    case GELU: LAYER(0.5 + 0.5 * erf((double)y * 0.7071067811865476)
                     + (double)y * exp(-0.5 * (double)y * y) * 0.3989422804014327); break;
    case SELU: LAYER(x > 0.0f ? selu_scale : (double)x + selu_scale_alpha); break;
    case SOFTSIGN: LAYER((1.0 - fabs((double)x)) * (1.0 - fabs((double)x))); break;
    default: LAYER(1.0); break; /* identity */
    }
    double n = 0;
    for (int64_t u = 0; u < units; u++) n += steepest[u] < flat; /* NaN is not flat */
    out[0] = pivot;
    out[1] = s;
    out[2] = s2;
    out[3] = ds;
    out[4] = n;
}

static double squares(const float *p, int64_t n) {
    double s = 0;
    _Pragma("omp simd reduction(+:s)")
    for (int64_t i = 0; i < n; i++) s += (double)p[i] * p[i];
    return s;
}

/* squares[i]: the sum of squares of tensors[i] (sizes[i] floats), for i < n_tensors;
   layer_sums[5 l .. 5 l + 4]: the pivot and sums of activation l (see `layer`), for l < n_layers, each
   (batch[l], units[l]) row-major with its own activation code and threshold (`a[l]` NULL unless its
   derivative needs the activation's input; `a` itself may be NULL); `phi` = {leaky_relu's negative
   slope, SELU's scale, SELU's scale * alpha}.
   The tensors and layers are shared among `threads` threads (torch's own OpenMP runtime, when built
   with it). Returns 0, or -1 if memory ran out. */
int gradexp_probe_sums(int n_tensors, const float *const *tensors, const int64_t *sizes, double *squares_out,
                       int n_layers, const float *const *h, const float *const *a, const int64_t *batch,
                       const int64_t *units, const int32_t *activation, const double *flat, const double *phi,
                       double *layer_sums, int threads) {
    const constants consts = {phi[0], phi[1], phi[2]};
    int next = 0, failed = 0;
    int64_t widest = 1;
    for (int l = 0; l < n_layers; l++) widest = units[l] > widest ? units[l] : widest;
    (void)threads;
#pragma omp parallel num_threads(threads)
    {
        double *steepest = n_layers ? malloc(sizeof(double) * (size_t)widest) : NULL;
        if (n_layers && steepest == NULL) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        for (;;) {
            int k = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            if (k >= n_tensors + n_layers) break;
            if (k < n_tensors) {
                squares_out[k] = squares(tensors[k], sizes[k]);
            } else if (steepest != NULL) {
                int l = k - n_tensors;
                layer(h[l], a ? a[l] : NULL, batch[l], units[l], activation[l], flat[l], &consts, steepest, layer_sums + 5 * l);
            }
        }
        free(steepest);
    }
    return failed ? -1 : 0;
}

/* The weight probes of n weight tensors (sizes[i] floats each), after an optimizer step: out[3 i ..
   3 i + 2] = ||W||^2, ||W - W_before||^2 and ||W - W_0||^2, in one pass over the three. */
int gradexp_weight_sums(int n, const float *const *now, const float *const *before, const float *const *initial,
                        const int64_t *sizes, double *out, int threads) {
    int next = 0;
    (void)threads;
#pragma omp parallel num_threads(threads)
    for (;;) {
        int k = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
        if (k >= n) break;
        const float *w = now[k], *b = before[k], *w0 = initial[k];
        double s = 0, step = 0, dist = 0;
        _Pragma("omp simd reduction(+:s, step, dist)")
        for (int64_t i = 0; i < sizes[k]; i++) {
            double x = w[i], d = x - b[i], e = x - w0[i];
            s += x * x;
            step += d * d;
            dist += e * e;
        }
        out[3 * k] = s;
        out[3 * k + 1] = step;
        out[3 * k + 2] = dist;
    }
    return 0;
}

/* An importable extension module with nothing in it: setuptools builds and installs it where Python
   finds it; its functions above are called through ctypes (the file at the module's origin). */
static struct PyModuleDef kernel_module = {PyModuleDef_HEAD_INIT, "_kernel", "gradexp's probe kernel (see reduce.py)", -1, NULL};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&kernel_module); }
