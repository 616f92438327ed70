// Latent-space decode attention on CPU: one call per layer for the whole batch.
//
// Same math and contract as kernels/latent_decode_torch.py (the reference it is tested
// against); see there for the formulas. One work item is a request (all its heads), or,
// when there are too few requests for the threads, a (request, KV head) pair; the items
// run in parallel (OpenMP). An item:
//   1. optionally appends the request's new token to its window (int8: quantised exactly
//      as storage.quantize does);
//   2. projects its query heads into every modality's key basis (each head through its KV
//      head's columns);
//   3. walks the compressed records in tiles of TILE tokens, read in place through the
//      block table: each record's K' and V' are converted to float32 once for all its heads
//      (the records are shared by the KV heads: their basis concatenates the heads),
//      scores and an online softmax (running maximum and sum per head) give each token's
//      weight, and V' is summed in rank space per modality;
//   4. adds the window rows to the same softmax, applies the value basis once per head
//      and normalises.
// Rows are converted into zero-padded float buffers of whole vectors (LANES floats), so
// every product below runs on whole vectors, whatever the rank or head size.
//
// Storage formats (`Args::storage`): int8 (factors, bases and window rows int8 with
// float32 scales; record offsets in bytes), float32 or bfloat16 (everything in that type;
// record offsets in elements). Built with the other CPU kernels by cpu_library.py.
#include "cpu_common.h"

namespace {

constexpr int64_t TILE = 16;  // records per online-softmax step

// Everything one call needs; filled by latent_decode_cpu.py (a ctypes.Structure of the
// same fields in the same order). Strides count elements of the storage type.
struct Args {
    int64_t batch, num_heads, kv_heads, head_size, num_planes, rank_k, rank_v;
    int64_t storage, window_size, num_threads;
    double scale;
    // per request
    const int32_t* block_table;
    int64_t block_table_stride, block_size;
    const int64_t* slot_ids;
    const int32_t* compressed_lens;
    const int32_t* window_lens;
    const int64_t* new_window_rows;
    // page records [num_blocks, block_size, width]
    const void* pages;
    int64_t page_stride_block, page_stride_row;
    int64_t k_offset, v_offset, k_scale_offset, v_scale_offset, flags_offset;
    const int64_t* cols_k_by_flag;  // nullptr: every token reads every column
    const int64_t* cols_v_by_flag;
    // slot rows (kernels/slot_rows.py): one arena [row, kv_width] with int8 scales
    // [row, kv_heads], and the arena row of each logical row: bases [slot, plane, row],
    // exact rows (sinks, then window) [slot, row]
    void* rows;
    int64_t row_stride;
    float* row_scales;
    int64_t row_scale_stride;
    const int64_t* basis_k_rows;
    int64_t basis_k_rows_strides[2];
    const int64_t* basis_v_rows;
    int64_t basis_v_rows_strides[2];
    const int64_t* window_k_rows;
    int64_t window_k_rows_stride;
    const int64_t* window_v_rows;
    int64_t window_v_rows_stride;
    // float32 inputs and outputs, contiguous
    const float* query;       // [B, H, D]
    const float* new_keys;    // [B, KV * D], or nullptr: the window append is done already
    const float* new_values;
    float* out;               // [B, H, D]
    float* probs_compressed;  // [B, KV, max_compressed_len] sums over the KV head's query heads, or nullptr
    int64_t probs_len;
    float* probs_window;      // [B, KV, window_size]
};

// a . b over n floats (n a multiple of LANES).
inline float dot(const float* a, const float* b, int64_t n) {
    vfloat acc = {};
    for (int64_t i = 0; i < n; i += LANES) acc += vload(a + i) * vload(b + i);
    return hsum(acc);
}

// The lane sums of TILE vectors as one vector (lane i: the sum of v[i]), by a tree of
// shuffles and adds: 15 steps instead of a horizontal sum per vector.
typedef int32_t vindex __attribute__((vector_size(LANES * sizeof(int32_t))));
static_assert(TILE == LANES, "a tile's scores are one vector");
static_assert(LANES == 16, "lane_sums is a four-level tree");

// One level of the tree: a and b hold groups of `size` lanes (each group: partial sums of one
// vector); the result holds a's groups, then b's, each folded to size / 2 lanes.
template <int size>
inline vfloat fold_groups(vfloat a, vfloat b) {
    vindex low, high;
    for (int k = 0; k < LANES; ++k) {
        const int half = size / 2, source = (k / half) * size + k % half;  // lane of concat(a, b)
        low[k] = source;
        high[k] = source + half;
    }
    return __builtin_shuffle(a, b, low) + __builtin_shuffle(a, b, high);
}

inline vfloat lane_sums(const vfloat* v) {
    vfloat l1[8], l2[4], l3[2];
    for (int k = 0; k < 8; ++k) l1[k] = fold_groups<16>(v[2 * k], v[2 * k + 1]);
    for (int k = 0; k < 4; ++k) l2[k] = fold_groups<8>(l1[2 * k], l1[2 * k + 1]);
    for (int k = 0; k < 2; ++k) l3[k] = fold_groups<4>(l2[2 * k], l2[2 * k + 1]);
    return fold_groups<2>(l3[0], l3[1]);
}

// q . rows[i] for the TILE rows of a tile ([TILE, width], width a multiple of LANES), as one vector.
inline vfloat tile_dots(const float* q, const float* rows, int64_t width) {
    vfloat acc[TILE] = {};
    for (int64_t c = 0; c < width; c += LANES) {
        const vfloat qc = vload(q + c);
        for (int64_t i = 0; i < TILE; ++i) acc[i] += qc * vload(rows + i * width + c);
    }
    return lane_sums(acc);
}

// y += sum_i w[i] * rows[i] over a tile's TILE rows (four independent sums per column vector).
inline void tile_axpy(const float* w, const float* rows, int64_t width, float* y) {
    for (int64_t c = 0; c < width; c += LANES) {
        vfloat s[4] = {};
        for (int64_t i = 0; i < TILE; ++i) s[i % 4] += w[i] * vload(rows + i * width + c);
        vstore(y + c, vload(y + c) + ((s[0] + s[1]) + (s[2] + s[3])));
    }
}

// y += w * x over n floats (n a multiple of LANES).
inline void axpy(float w, const float* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; i += LANES) vstore(y + i, vload(y + i) + w * vload(x + i));
}

template <typename T>
struct Kernel {
    const Args& a;
    const int64_t D, G, M, Dp, Rk, Rv;  // head size, query heads per KV head, planes; padded widths

    explicit Kernel(const Args& args)
        : a(args), D(args.head_size), G(args.num_heads / args.kv_heads), M(args.num_planes),
          Dp(padded(args.head_size)), Rk(padded(args.rank_k)), Rv(padded(args.rank_v)) {}

    // Arena row `at`, KV head g's columns, into `out` (Dp floats).
    void arena_row(int64_t at, int64_t g, float* out) const {
        const T* p = static_cast<const T*>(a.rows) + at * a.row_stride + g * D;
        load(p, a.row_scales ? a.row_scales[at * a.row_scale_stride + g] : 1.f, out, D, Dp);
    }

    // The arena row of row `row` of plane `plane` of a slot's basis (`rows`: basis_k_rows or basis_v_rows).
    static int64_t basis_at(const int64_t* rows, const int64_t* st, int64_t slot, int64_t plane, int64_t row) {
        return rows[slot * st[0] + plane * st[1] + row];
    }

    float record_scale(const T* rec, int64_t offset) const {
        if constexpr (std::is_same_v<T, int8_t>) return float_at(rec, offset);
        return 1.f;
    }

    // The new token's row of KV head g into arena row `at` (int8: absmax / 127 per row and
    // head, as storage.quantize).
    void append(const float* x, int64_t at, int64_t g) const {
        T* dst = static_cast<T*>(a.rows) + at * a.row_stride + g * D;
        store_row(x, D, dst, a.row_scales ? &a.row_scales[at * a.row_scale_stride + g] : nullptr);
    }

    // Scratch of one work item, reused across the items a thread runs.
    struct Scratch {
        std::vector<float> q, q_lat, acc, scores, k_tile, v_tile, weights, row, out, top, total;
        std::vector<int64_t> planes;
    };

    // Online softmax of head j of the item's `heads`: `n` new scores join the running maximum
    // and sum; the accumulators scaled by the old maximum are rescaled. Leaves
    // exp(score - max) in `p`.
    void softmax_step(Scratch& s, int64_t heads, int64_t j, const float* scores, float* p, int64_t n) const {
        float tile_top = -FLT_MAX;
        if (n == TILE) tile_top = hmax(vload(scores));
        else for (int64_t i = 0; i < n; ++i) tile_top = std::max(tile_top, scores[i]);
        float& top = s.top[j];
        if (tile_top > top) {
            const float shrink = top == -FLT_MAX ? 0.f : std::exp(top - tile_top);  // 0: nothing yet
            s.total[j] *= shrink;
            for (int64_t m = 0; m < M; ++m)
                for (int64_t r = 0; r < Rv; ++r) s.acc[(m * heads + j) * Rv + r] *= shrink;
            top = tile_top;
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
            p[i] = std::exp(scores[i] - top);
            sum += p[i];
        }
        s.total[j] += sum;
    }

    // One work item: request b, KV heads [g0, g1), that is query heads [g0 * G, g1 * G).
    // Every record is read and converted once for all of the item's heads.
    void run(int64_t b, int64_t g0, int64_t g1, Scratch& s) const {
        const int64_t slot = a.slot_ids[b];
        const int64_t c = a.compressed_lens[b], wl = a.window_lens[b], L = c + wl;
        const int64_t H = a.num_heads, KV = a.kv_heads, N = (g1 - g0) * G, h0 = g0 * G;
        s.q.assign(N * Dp, 0.f);
        s.q_lat.assign(M * N * Rk, 0.f);
        s.acc.assign(M * N * Rv, 0.f);
        s.scores.resize(N * L);
        s.k_tile.resize(TILE * Rk);
        s.v_tile.resize(TILE * Rv);
        s.weights.resize(M * N * TILE);
        s.row.resize(std::max(Dp, std::max(Rk, Rv)));
        s.out.assign(N * Dp, 0.f);
        s.top.assign(N, -FLT_MAX);
        s.total.assign(N, 0.f);
        s.planes.resize(TILE);
        float* row = s.row.data();

        if (a.new_keys) {
            const int64_t w = a.new_window_rows[b];
            const int64_t at_k = a.window_k_rows[slot * a.window_k_rows_stride + w];
            const int64_t at_v = a.window_v_rows[slot * a.window_v_rows_stride + w];
            for (int64_t g = g0; g < g1; ++g) {
                append(a.new_keys + (b * KV + g) * D, at_k, g);
                append(a.new_values + (b * KV + g) * D, at_v, g);
            }
        }
        // Scaled queries, and each modality's latent queries q_lat[m][j] = D_k[m][:, g] q_j
        // (g: head j's KV head).
        for (int64_t j = 0; j < N; ++j) {
            const float* q = a.query + (b * H + h0 + j) * D;
            for (int64_t d = 0; d < D; ++d) s.q[j * Dp + d] = q[d] * static_cast<float>(a.scale);
        }
        for (int64_t m = 0; m < M; ++m)
            for (int64_t r = 0; r < a.rank_k; ++r)
                for (int64_t g = g0; g < g1; ++g) {
                    arena_row(basis_at(a.basis_k_rows, a.basis_k_rows_strides, slot, m, r), g, row);
                    for (int64_t j = (g - g0) * G; j < (g - g0 + 1) * G; ++j)
                        s.q_lat[(m * N + j) * Rk + r] = dot(row, &s.q[j * Dp], Dp);
                }

        // Compressed records, TILE at a time: walk the block table without dividing per token.
        const T* pages = static_cast<const T*>(a.pages);
        const int32_t* blocks = a.block_table + b * a.block_table_stride;
        int64_t page = 0, in_page = 0;
        for (int64_t t0 = 0; t0 < c; t0 += TILE) {
            // A last, partial tile computes on its other rows too (finite leftovers of the tile
            // before, or zeros) and discards those scores; their weights are zero.
            const int64_t n = std::min(TILE, c - t0);
            float k_scales[TILE] = {}, v_scales[TILE] = {};
            int planes_here = 0;  // bit m: the tile holds tokens of plane m
            for (int64_t i = 0; i < n; ++i) {
                const T* rec = pages + blocks[page] * a.page_stride_block + in_page * a.page_stride_row;
                if (++in_page == a.block_size) in_page = 0, ++page;
                const int64_t flags = static_cast<int64_t>(to_float(rec[a.flags_offset]));
                s.planes[i] = M > 1 ? (flags & 1) : 0;
                planes_here |= 1 << s.planes[i];
                load(rec + a.k_offset, 1.f, &s.k_tile[i * Rk], a.cols_k_by_flag ? a.cols_k_by_flag[flags] : a.rank_k, Rk);
                load(rec + a.v_offset, 1.f, &s.v_tile[i * Rv], a.cols_v_by_flag ? a.cols_v_by_flag[flags] : a.rank_v, Rv);
                k_scales[i] = record_scale(rec, a.k_scale_offset);
                v_scales[i] = record_scale(rec, a.v_scale_offset);
            }
            // Image spans are long, so most tiles hold one plane: only a mixed tile pays for both.
            // A full tile of one plane (most tiles) scales and weighs its scores as whole vectors.
            const bool whole = n == TILE && planes_here != 3;
            const vfloat k_scale = vload(k_scales), v_scale = vload(v_scales);
            for (int64_t j = 0; j < N; ++j) {
                vfloat dots;
                if (planes_here == 2) {  // image tokens only: the image plane's latent query
                    dots = tile_dots(&s.q_lat[(N + j) * Rk], s.k_tile.data(), Rk);
                } else {
                    dots = tile_dots(&s.q_lat[j * Rk], s.k_tile.data(), Rk);
                    if (planes_here == 3) {  // image tokens score against the image plane's latent query
                        const vfloat image = tile_dots(&s.q_lat[(N + j) * Rk], s.k_tile.data(), Rk);
                        for (int64_t i = 0; i < n; ++i)
                            if (s.planes[i]) dots[i] = image[i];
                    }
                }
                float* scores = &s.scores[j * L + t0];
                if (whole) vstore(scores, dots * k_scale);
                else for (int64_t i = 0; i < n; ++i) scores[i] = dots[i] * k_scales[i];
                float p[TILE];
                softmax_step(s, N, j, scores, p, n);
                if (whole) {  // the tile's one plane: bit 1 is plane 0, bit 2 plane 1
                    vstore(&s.weights[((planes_here >> 1) * N + j) * TILE], vload(p) * v_scale);
                    continue;
                }
                for (int64_t m = 0; m < M; ++m) {  // a token's weight goes to its own plane only
                    if (!(planes_here >> m & 1)) continue;
                    for (int64_t i = 0; i < TILE; ++i)
                        s.weights[(m * N + j) * TILE + i] = i < n && s.planes[i] == m ? p[i] * v_scales[i] : 0.f;
                }
            }
            for (int64_t m = 0; m < M; ++m) {  // acc[m][j] += sum_i weight * V'_i
                if (!(planes_here >> m & 1)) continue;
                for (int64_t j = 0; j < N; ++j)
                    tile_axpy(&s.weights[(m * N + j) * TILE], s.v_tile.data(), Rv, &s.acc[(m * N + j) * Rv]);
            }
        }

        // Window rows join the same softmax; their values are summed directly.
        for (int64_t w = 0; w < wl; ++w)
            for (int64_t g = g0; g < g1; ++g) {
                arena_row(a.window_k_rows[slot * a.window_k_rows_stride + w], g, row);
                for (int64_t j = (g - g0) * G; j < (g - g0 + 1) * G; ++j)
                    s.scores[j * L + c + w] = dot(&s.q[j * Dp], row, Dp);
            }
        for (int64_t j = 0; j < N; ++j) {
            float* scores = &s.scores[j * L + c];
            softmax_step(s, N, j, scores, scores, wl);  // window scores become exp(score - max) in place
        }
        for (int64_t m = 0; m < M; ++m)
            for (int64_t r = 0; r < a.rank_v; ++r)
                for (int64_t g = g0; g < g1; ++g) {
                    arena_row(basis_at(a.basis_v_rows, a.basis_v_rows_strides, slot, m, r), g, row);
                    for (int64_t j = (g - g0) * G; j < (g - g0 + 1) * G; ++j)
                        axpy(s.acc[(m * N + j) * Rv + r], row, &s.out[j * Dp], Dp);
                }
        for (int64_t w = 0; w < wl; ++w)
            for (int64_t g = g0; g < g1; ++g) {
                arena_row(a.window_v_rows[slot * a.window_v_rows_stride + w], g, row);
                for (int64_t j = (g - g0) * G; j < (g - g0 + 1) * G; ++j)
                    axpy(s.scores[j * L + c + w], row, &s.out[j * Dp], Dp);
            }
        for (int64_t j = 0; j < N; ++j) {
            const float inv = 1.f / s.total[j];
            float* out = a.out + (b * H + h0 + j) * D;
            for (int64_t d = 0; d < D; ++d) out[d] = s.out[j * Dp + d] * inv;
        }

        if (a.probs_compressed) {  // summed over each KV head's G heads; the caller averages over all heads
            for (int64_t j = 0; j < N; ++j) {
                float* pc = a.probs_compressed + (b * KV + g0 + j / G) * a.probs_len;
                float* pw = a.probs_window + (b * KV + g0 + j / G) * a.window_size;
                const float inv = 1.f / s.total[j], top = s.top[j];
                const float* scores = &s.scores[j * L];
                for (int64_t t = 0; t < c; ++t) pc[t] += std::exp(scores[t] - top) * inv;
                for (int64_t w = 0; w < wl; ++w) pw[w] += scores[c + w] * inv;
            }
        }
    }

    // Work items: a request each (its records converted once for all heads), or, when
    // there are too few requests to keep the threads busy, a (request, KV head) pair each.
    void run_all() const {
        const bool per_head = a.num_threads > 1 && a.batch < 4 * a.num_threads;
        const int64_t groups = per_head ? a.kv_heads : 1, span = a.kv_heads / groups;
        const int64_t items = a.batch * groups;
#pragma omp parallel num_threads(a.num_threads)
        {
            Scratch scratch;
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < items; ++i) {
                const int64_t g0 = i % groups * span;
                run(i / groups, g0, g0 + span, scratch);
            }
        }
    }
};

}  // namespace

extern "C" int attentionpack_latent_decode(const Args* args) {
    switch (args->storage) {
        case INT8: Kernel<int8_t>(*args).run_all(); return 0;
        case FLOAT32: Kernel<float>(*args).run_all(); return 0;
        case BFLOAT16: Kernel<Bf16>(*args).run_all(); return 0;
    }
    return 1;  // unknown storage
}

// The size of Args, so the Python side can check its structure matches.
extern "C" int64_t attentionpack_args_size() { return sizeof(Args); }
