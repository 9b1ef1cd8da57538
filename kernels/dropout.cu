// dropout.cu — standalone hidden dropout (the reference for the fused versions): element (r, c) of an (N,C)
// activation times the factor of (window roww[r], position pos[r], feature c) from the dropout stream.
#include "common.cuh"

struct DropoutParams {
    u64 out, inp, pos, roww, site;
    int n, c;
    float p;
    int out_dt, inp_dt, _pad;
    u64 step;
};
CHECK_LAYOUT(DropoutParams, 72);
CHECK_FIELD(DropoutParams, out, 0);
CHECK_FIELD(DropoutParams, inp, 8);
CHECK_FIELD(DropoutParams, pos, 16);
CHECK_FIELD(DropoutParams, roww, 24);
CHECK_FIELD(DropoutParams, site, 32);
CHECK_FIELD(DropoutParams, n, 40);
CHECK_FIELD(DropoutParams, c, 44);
CHECK_FIELD(DropoutParams, p, 48);
CHECK_FIELD(DropoutParams, out_dt, 52);
CHECK_FIELD(DropoutParams, inp_dt, 56);
CHECK_FIELD(DropoutParams, _pad, 60);
CHECK_FIELD(DropoutParams, step, 64);

extern "C" __global__ void dropout_forward(DropoutParams a) {
    const u64 seed = dropout_seed(a);
    u64 total = (u64)a.n * a.c;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int r = (int)(i / a.c), c = (int)(i % a.c);
        float f = hidden_factor(seed, ((const int*)a.roww)[r], ((const int*)a.pos)[r], c, a.p);
        store_dt(a.out, a.out_dt, i, load_dt(a.inp, a.inp_dt, i) * f);
    }
}
