// dropout.cu — standalone dropout (reference for the fused versions): out[i] = inp[i] * factor(seed, i).
#include "common.cuh"

struct DropoutParams {
    u64 out, inp, seed, n;
    float p;
    int out_dt, inp_dt, _pad;
};
CHECK_LAYOUT(DropoutParams, 48);
CHECK_FIELD(DropoutParams, out, 0);
CHECK_FIELD(DropoutParams, inp, 8);
CHECK_FIELD(DropoutParams, seed, 16);
CHECK_FIELD(DropoutParams, n, 24);
CHECK_FIELD(DropoutParams, p, 32);
CHECK_FIELD(DropoutParams, out_dt, 36);
CHECK_FIELD(DropoutParams, inp_dt, 40);
CHECK_FIELD(DropoutParams, _pad, 44);

extern "C" __global__ void dropout_forward(DropoutParams a) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < a.n; i += (u64)gridDim.x * blockDim.x) {
        store_dt(a.out, a.out_dt, i, load_dt(a.inp, a.inp_dt, i) * dropout_factor(a.seed, i, a.p));
    }
}
