// The two passes of a window fold that touch every old text record, on CPU, in place.
//
// A fold (attentionpack_vllm/paged_store.py, fold_windows) needs of a request's old text
// factors only their columns' energies (their Gram matrix is diagonal: see
// factorize.fold_batch_diagonal), and afterwards rotates each of them into the new basis.
// Both passes read the records where they are stored, through the fold's flat page slots,
// so no [requests, tokens, width] copy is made:
//   text_energies:        energies[f][r] = sum over text tokens t of F[t][r]^2 (float64);
//   rotate_text_records:  F[t] <- F[t] @ rotation[f] for every text token, re-quantised
//                         (int8) or rounded (16-bit) as kernels/storage.py writes records.
// Image tokens, importance and flags are left as they are.
#include "cpu_common.h"

namespace {

// Filled by fold_cpu.py (a ctypes.Structure of the same fields in the same order).
struct FoldArgs {
    int64_t folds, rank_k, rank_v, storage, num_threads;  // rank_k, rank_v: the text ranks
    const int64_t* record_slots;  // [folds, record_slots_stride] flat page slots, in token order
    int64_t record_slots_stride;
    const int64_t* compressed_lens;  // [folds] old tokens (records before the window's)
    void* pages;                     // flat rows of `width` elements (bytes with int8)
    int64_t width, k_offset, v_offset, k_scale_offset, v_scale_offset, flags_offset;
    double* energies_k;        // [folds, rank_k] (text_energies)
    double* energies_v;        // [folds, rank_v]
    const float* rotation_k;   // [folds, rank_k, rank_k] (rotate_text_records)
    const float* rotation_v;   // [folds, rank_v, rank_v]
};

constexpr int64_t IMAGE = 1;
constexpr int64_t CHUNK = 64;  // tokens per parallel work item of the rotation

// out = in @ rotation for a row of VECTORS * LANES columns (rotation rows padded alike).
template <int VECTORS>
inline void times(const float* in, int64_t rank, const float* rotation, float* out) {
    vfloat acc[VECTORS] = {};
    for (int64_t r = 0; r < rank; ++r)
        for (int c = 0; c < VECTORS; ++c) acc[c] += in[r] * vload(rotation + (r * VECTORS + c) * LANES);
    for (int c = 0; c < VECTORS; ++c) vstore(out + c * LANES, acc[c]);
}

template <typename T>
struct Records {
    const FoldArgs& a;

    T* row(int64_t f, int64_t t) const {
        return static_cast<T*>(a.pages) + a.record_slots[f * a.record_slots_stride + t] * a.width;
    }
    bool is_text(const T* rec) const { return (static_cast<int64_t>(to_float(rec[a.flags_offset])) & 1) != IMAGE; }
    float scale(const T* rec, int64_t offset) const {
        if constexpr (std::is_same_v<T, int8_t>) return float_at(rec, offset);
        return 1.f;
    }

    void energies(int64_t f) const {
        std::vector<float> row_k(padded(a.rank_k)), row_v(padded(a.rank_v));
        double* ek = a.energies_k + f * a.rank_k;
        double* ev = a.energies_v + f * a.rank_v;
        std::fill(ek, ek + a.rank_k, 0.0);
        std::fill(ev, ev + a.rank_v, 0.0);
        for (int64_t t = 0; t < a.compressed_lens[f]; ++t) {
            const T* rec = row(f, t);
            if (!is_text(rec)) continue;
            load(rec + a.k_offset, scale(rec, a.k_scale_offset), row_k.data(), a.rank_k, row_k.size());
            load(rec + a.v_offset, scale(rec, a.v_scale_offset), row_v.data(), a.rank_v, row_v.size());
            for (int64_t r = 0; r < a.rank_k; ++r) ek[r] += static_cast<double>(row_k[r]) * row_k[r];
            for (int64_t r = 0; r < a.rank_v; ++r) ev[r] += static_cast<double>(row_v[r]) * row_v[r];
        }
    }

    // One factor field of a record times the rotation (rows padded to whole vectors), stored back.
    void rotate_field(T* rec, int64_t offset, int64_t scale_offset, int64_t rank, const float* rotation,
                      float* in, float* out) const {
        const int64_t width = padded(rank);
        load(rec + offset, scale(rec, scale_offset), in, rank, width);
        switch (width / LANES) {  // the output row held in registers across the rank's steps
            case 1: times<1>(in, rank, rotation, out); break;
            case 2: times<2>(in, rank, rotation, out); break;
            case 3: times<3>(in, rank, rotation, out); break;
            case 4: times<4>(in, rank, rotation, out); break;
            case 5: times<5>(in, rank, rotation, out); break;
            case 6: times<6>(in, rank, rotation, out); break;
            case 7: times<7>(in, rank, rotation, out); break;
            case 8: times<8>(in, rank, rotation, out); break;
            default:
                std::fill(out, out + width, 0.f);
                for (int64_t r = 0; r < rank; ++r)
                    for (int64_t c = 0; c < width; c += LANES)
                        vstore(out + c, vload(out + c) + in[r] * vload(rotation + r * width + c));
        }
        float s = 0.f;
        store_row(out, rank, rec + offset, &s);
        if constexpr (std::is_same_v<T, int8_t>) std::memcpy(rec + scale_offset, &s, sizeof s);
    }

    void rotate_all() const {
        const int64_t pk = padded(a.rank_k), pv = padded(a.rank_v);
        // The rotations with rows padded to whole vectors (zero columns past the rank).
        std::vector<float> rot_k(a.folds * a.rank_k * pk, 0.f), rot_v(a.folds * a.rank_v * pv, 0.f);
        for (int64_t f = 0; f < a.folds; ++f) {
            for (int64_t r = 0; r < a.rank_k; ++r)
                std::memcpy(&rot_k[(f * a.rank_k + r) * pk], a.rotation_k + (f * a.rank_k + r) * a.rank_k,
                            sizeof(float) * a.rank_k);
            for (int64_t r = 0; r < a.rank_v; ++r)
                std::memcpy(&rot_v[(f * a.rank_v + r) * pv], a.rotation_v + (f * a.rank_v + r) * a.rank_v,
                            sizeof(float) * a.rank_v);
        }
        int64_t longest = 0;
        for (int64_t f = 0; f < a.folds; ++f) longest = std::max<int64_t>(longest, a.compressed_lens[f]);
        const int64_t chunks = (longest + CHUNK - 1) / CHUNK, items = a.folds * chunks;
#pragma omp parallel num_threads(a.num_threads)
        {
            std::vector<float> in(std::max(pk, pv)), out(std::max(pk, pv));
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < items; ++item) {
                const int64_t f = item / chunks, start = (item % chunks) * CHUNK;
                const int64_t end = std::min<int64_t>(start + CHUNK, a.compressed_lens[f]);
                for (int64_t t = start; t < end; ++t) {
                    T* rec = row(f, t);
                    if (!is_text(rec)) continue;
                    rotate_field(rec, a.k_offset, a.k_scale_offset, a.rank_k, &rot_k[f * a.rank_k * pk], in.data(), out.data());
                    rotate_field(rec, a.v_offset, a.v_scale_offset, a.rank_v, &rot_v[f * a.rank_v * pv], in.data(), out.data());
                }
            }
        }
    }

    void energies_all() const {
#pragma omp parallel for num_threads(a.num_threads) schedule(dynamic, 1)
        for (int64_t f = 0; f < a.folds; ++f) energies(f);
    }
};

template <typename Fn>
int dispatch(const FoldArgs* args, Fn&& fn) {
    switch (args->storage) {
        case INT8: fn(Records<int8_t>{*args}); return 0;
        case FLOAT32: fn(Records<float>{*args}); return 0;
        case BFLOAT16: fn(Records<Bf16>{*args}); return 0;
    }
    return 1;  // unknown storage
}

}  // namespace

extern "C" int attentionpack_text_energies(const FoldArgs* args) {
    return dispatch(args, [](auto records) { records.energies_all(); });
}

extern "C" int attentionpack_rotate_text_records(const FoldArgs* args) {
    return dispatch(args, [](auto records) { records.rotate_all(); });
}

extern "C" int64_t attentionpack_fold_args_size() { return sizeof(FoldArgs); }
