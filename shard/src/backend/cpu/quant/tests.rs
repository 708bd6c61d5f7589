//! Integer kernels against f32 arithmetic on the same dequantized values, for every kernel set
//! this CPU runs, both group sizes, nibble and byte storage, and ragged shapes.

use half::f16;
use tessera_formats::gguf::affine::Affine;

use super::*;

/// A deterministic pseudo-random affine tensor (scales and offsets already f16-exact).
fn affine(rows: usize, cols: usize, group: usize, bits: u32, seed: u64) -> Affine {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let q = (0..rows * cols)
        .map(|_| (next() % (1 << bits)) as u8)
        .collect();
    let groups = rows * cols / group;
    let f16ish = |v: f32| f16::from_f32(v).to_f32();
    let scale = (0..groups)
        .map(|_| f16ish((next() % 1000) as f32 / 40_000.0 + 1e-4))
        .collect();
    let offset = (0..groups)
        .map(|_| f16ish(-((next() % 1000) as f32) / 5_000.0))
        .collect();
    Affine {
        group,
        bits,
        q,
        scale,
        offset,
    }
}

/// `a` made symmetric: every offset `−2^(bits−1)·scale`, as in Q8_0, Q4_0, Q5_0, Q3_K and Q6_K.
fn symmetric(mut a: Affine) -> Affine {
    let zero = (1 << (a.bits - 1)) as f32;
    a.offset = a.scale.iter().map(|d| -zero * d).collect();
    a
}

/// Each layout test's tensor as generated and made symmetric.
fn both(a: Affine) -> [Affine; 2] {
    [a.clone(), symmetric(a)]
}

fn dequantized(a: &Affine) -> Vec<f32> {
    a.q.iter()
        .enumerate()
        .map(|(i, &q)| a.scale[i / a.group] * q as f32 + a.offset[i / a.group])
        .collect()
}

fn activations(n: usize, k: usize) -> Vec<f32> {
    (0..n * k)
        .map(|i| ((i * 104_729 % 97) as f32 - 48.0) / 32.0)
        .collect()
}

/// The kernels' formula in f64: per group, `d·dx·Σ q·qx + o·(dx·Σ qx)` with the stored (f16)
/// activation scales and sums, or `d·dx·(Σ q·qx − zero·Σ qx)` for symmetric weights (`zero` > 0).
fn reference(acts: &QuantActs, n: usize, a: &Affine, zero: i32, m: usize, k: usize) -> Vec<f32> {
    let g = a.group;
    let mut out = vec![0.0; n * m];
    for t in 0..n {
        for j in 0..m {
            let mut y = 0f64;
            for c0 in (0..k).step_by(g) {
                let (qx, dx, sx) = acts.group(t, c0 / g);
                let at = (j * k + c0) / g;
                let dot: i64 = (0..g)
                    .map(|i| qx[i] as i64 * a.q[j * k + c0 + i] as i64)
                    .sum();
                y += if zero != 0 {
                    let total = acts.total(t, c0 / g) as i64;
                    a.scale[at] as f64 * dx as f64 * (dot - zero as i64 * total) as f64
                } else {
                    a.scale[at] as f64 * dx as f64 * dot as f64 + a.offset[at] as f64 * sx as f64
                };
            }
            out[t * m + j] = y as f32;
        }
    }
    out
}

#[test]
fn pack_keeps_every_value() {
    for (group, bits) in [
        (32, 4),
        (32, 5),
        (32, 6),
        (32, 8),
        (16, 2),
        (16, 5),
        (16, 6),
    ] {
        for a in both(affine(19, 96, group, bits, 7)) {
            let packed = QuantPanels::pack(19, 96, &a).unwrap();
            let want = dequantized(&a);
            let mut row = vec![0.0; 96];
            for r in 0..19 {
                packed.row_f32(r, &mut row);
                assert_eq!(
                    row,
                    want[r * 96..(r + 1) * 96],
                    "group {group} bits {bits} zero {} row {r}",
                    packed.zero
                );
            }
        }
    }
}

/// Symmetric weights are recognized and held without offsets: two groups' scales to a line.
#[test]
fn symmetric_blocks_hold_no_offsets() {
    for (group, bits) in [(32, 8), (32, 4), (32, 5), (16, 6), (16, 3)] {
        let (m, k) = (32, 8 * group);
        let [asymmetric, symmetric] = both(affine(m, k, group, bits, 5));
        let (a, s) = (
            QuantPanels::pack(m, k, &asymmetric).unwrap(),
            QuantPanels::pack(m, k, &symmetric).unwrap(),
        );
        assert_eq!((a.zero, s.zero), (0, 1 << (bits - 1)));
        let quant = a.nbytes() - 2 * 8 * 64;
        assert_eq!(s.nbytes(), quant + 2 * 4 * 64, "g{group} b{bits}");
    }
}

/// (group, bits) of every panel layout and kernel variant: nibbles, nibbles with one or two plane
/// bits (5–6 bits) and bytes (7–8 bits), in groups of 32 and 16.
const LAYOUTS: [(usize, u32); 10] = [
    (32, 4),
    (32, 5),
    (32, 6),
    (32, 7),
    (32, 8),
    (16, 2),
    (16, 3),
    (16, 5),
    (16, 6),
    (16, 8),
];

#[test]
fn every_kernel_set_matches_f32_arithmetic() {
    for (group, bits) in LAYOUTS {
        for (n, m, k) in [(1, 16, 32), (3, 33, 64), (5, 40, 96), (70, 24, 128)] {
            for a in both(affine(m, k, group, bits, (n * m + k) as u64)) {
                let packed = QuantPanels::pack(m, k, &a).unwrap();
                let x = activations(n, k);
                let acts = QuantActs::new(&x, n, k, group);
                let want = reference(&acts, n, &a, packed.zero, m, k);
                for kernels in Kernels::supported() {
                    let mut out = vec![f32::NAN; n * m];
                    matmul_with(&x, n, std::slice::from_ref(&packed), &mut out, kernels);
                    for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{kernels:?} g{group} b{bits} zero {} n={n} m={m} k={k} at {i}: \
                             {a} vs {b}",
                            packed.zero
                        );
                    }
                }
            }
        }
    }
}

/// Blocks of different layouts stacked by rows (a fused q/k/v whose parts differ in format)
/// multiply as each block alone, into its own columns, bit for bit.
#[test]
fn stacked_blocks_multiply_as_each_alone() {
    let k = 128;
    let parts = [(40, 32, 5), (16, 16, 6), (8, 32, 8), (24, 32, 4)];
    let blocks: Vec<QuantPanels> = parts
        .iter()
        .map(|&(rows, group, bits)| {
            let a = affine(rows, k, group, bits, rows as u64);
            QuantPanels::pack(rows, k, &a).unwrap()
        })
        .collect();
    let m: usize = blocks.iter().map(|b| b.rows).sum();
    for n in [1, 9, 70] {
        let x = activations(n, k);
        for kernels in Kernels::supported() {
            let mut all = vec![f32::NAN; n * m];
            matmul_with(&x, n, &blocks, &mut all, kernels);
            let mut column = 0;
            for b in &blocks {
                let mut alone = vec![f32::NAN; n * b.rows];
                matmul_with(&x, n, std::slice::from_ref(b), &mut alone, kernels);
                for t in 0..n {
                    let got = &all[t * m + column..t * m + column + b.rows];
                    let want = &alone[t * b.rows..(t + 1) * b.rows];
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(got), bits(want), "{kernels:?} n={n} block at {column}");
                }
                column += b.rows;
            }
            for (r, c) in [(0, 5), (45, 17), (63, 127), (87, 64)] {
                let (mut row, mut before) = (r, 0);
                let b = blocks.iter().find(|b| {
                    let inside = row < b.rows;
                    if !inside {
                        row -= b.rows;
                        before += b.rows;
                    }
                    inside
                });
                assert_eq!(get(&blocks, r, c), b.unwrap().get(r - before, c));
            }
        }
    }
}

/// Quantizing activations to int8 per group costs well under 1% of the output's norm.
#[test]
fn activation_quantization_error_is_small() {
    let (n, m, k) = (4, 48, 256);
    let a = affine(m, k, 32, 4, 3);
    let w = dequantized(&a);
    let packed = QuantPanels::pack(m, k, &a).unwrap();
    let x = activations(n, k);
    let mut out = vec![0.0; n * m];
    matmul(&x, n, std::slice::from_ref(&packed), &mut out);
    let (mut err, mut norm) = (0f64, 0f64);
    for t in 0..n {
        for j in 0..m {
            let exact: f64 = (0..k)
                .map(|c| x[t * k + c] as f64 * w[j * k + c] as f64)
                .sum();
            err += (out[t * m + j] as f64 - exact).powi(2);
            norm += exact * exact;
        }
    }
    assert!(
        (err / norm).sqrt() < 0.01,
        "relative error {}",
        (err / norm).sqrt()
    );
}

#[test]
fn pack_refuses_what_it_cannot_hold() {
    let a = affine(2, 32, 32, 4, 1);
    assert!(QuantPanels::pack(2, 48, &a).is_err());
    let mut wide = a.clone();
    wide.group = 8;
    assert!(QuantPanels::pack(2, 32, &wide).is_err());
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_levels_equal_the_scalar_ones() {
    if !avx2::available() {
        return;
    }
    let mut x = activations(4, 32);
    x.extend([0.0; 32]);
    for xg in x.chunks_exact(32) {
        let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
        // SAFETY: AVX2 checked above; both groups hold 32 values.
        let fast = unsafe { avx2::levels32(xg, &mut a) };
        assert_eq!(fast, levels(xg, &mut b));
        assert_eq!(a, b);
    }
}

#[test]
fn a_token_row_does_not_depend_on_the_others() {
    let (m, k) = (70, 256);
    for (group, bits) in LAYOUTS {
        for a in both(affine(m, k, group, bits, 11)) {
            let packed = QuantPanels::pack(m, k, &a).unwrap();
            let x = activations(19, k);
            for kernels in Kernels::supported() {
                let mut all = vec![0f32; 19 * m];
                matmul_with(&x, 19, std::slice::from_ref(&packed), &mut all, kernels);
                for t in [0, 7, 8, 18] {
                    let mut one = vec![0f32; m];
                    let one_block = std::slice::from_ref(&packed);
                    matmul_with(&x[t * k..(t + 1) * k], 1, one_block, &mut one, kernels);
                    assert_eq!(
                        one,
                        all[t * m..(t + 1) * m],
                        "{kernels:?} g{group} b{bits} zero {} token {t}",
                        packed.zero
                    );
                }
            }
        }
    }
}

/// Joining a panel into bytes gives the same lines on every kernel set (AVX2's join for nibbles
/// with and without plane bits, which AMX prefill uses for every nibble layout).
#[test]
fn every_join_gives_the_same_bytes() {
    let (m, k) = (40, 128);
    for (group, bits) in LAYOUTS {
        for a in both(affine(m, k, group, bits, 13)) {
            let packed = QuantPanels::pack(m, k, &a).unwrap();
            let blank = || QuantPanels {
                lines: Vec::new(),
                ..packed
            };
            let (mut want, mut got) = (blank(), blank());
            for p in 0..m.div_ceil(ROWS) {
                packed.expand_panel(p, &mut want, Kernels::Portable);
                for kernels in Kernels::supported() {
                    packed.expand_panel(p, &mut got, kernels);
                    let bytes = |w: &QuantPanels| w.lines.iter().map(|l| l.0).collect::<Vec<_>>();
                    assert!(
                        bytes(&got) == bytes(&want),
                        "{kernels:?} g{group} b{bits} panel {p}"
                    );
                }
            }
        }
    }
}

/// AMX's tile logic, run on the tile instructions as emulated from Intel's definitions, multiplies
/// panels joined to bytes bit for bit like the VNNI and AVX2 kernels (so a token's result does not
/// depend on which kernel its tile met) and as the f64 reference does within f32 rounding.
#[test]
fn amx_tile_logic_matches_the_integer_kernels_bit_for_bit() {
    let (n, m, k) = (13, 40, 128);
    let exact: Vec<Kernels> = Kernels::supported()
        .into_iter()
        .filter(|k| matches!(k, Kernels::Avx2 | Kernels::Vnni))
        .collect();
    for (group, bits) in LAYOUTS {
        for a in both(affine(m, k, group, bits, 9)) {
            let packed = QuantPanels::pack(m, k, &a).unwrap();
            let x = activations(n, k);
            let acts = QuantActs::new(&x, n, k, group);
            let want = reference(&acts, n, &a, packed.zero, m, k);
            let mut joined = QuantPanels {
                lines: Vec::new(),
                ..packed
            };
            for p in 0..m.div_ceil(ROWS) {
                packed.expand_panel(p, &mut joined, Kernels::Portable);
                for t0 in (0..n).step_by(TOKENS) {
                    let mr = TOKENS.min(n - t0);
                    let mut tiles = [[f32::NAN; ROWS]; TOKENS];
                    amx::emulated::kernel(&acts, t0, mr, &joined, 0, &mut tiles);
                    let case = format!("g{group} b{bits} zero {} panel {p} t0 {t0}", packed.zero);
                    for kernels in &exact {
                        let mut acc = [[f32::NAN; ROWS]; TOKENS];
                        kernel_fn(*kernels)(&acts, t0, mr, &joined, 0, &mut acc);
                        let bits = |a: &[[f32; ROWS]]| {
                            a.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>()
                        };
                        assert_eq!(bits(&tiles[..mr]), bits(&acc[..mr]), "{kernels:?} {case}");
                    }
                    for (i, row) in tiles.iter().take(mr).enumerate() {
                        for (r, y) in row.iter().take(m - p * ROWS).enumerate() {
                            let b = want[(t0 + i) * m + p * ROWS + r];
                            assert!(
                                (y - b).abs() <= 1e-4 * (1.0 + b.abs()),
                                "{case}: {y} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The AMX probe's child process reports each outcome, a crash included, and the parent lives on.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[test]
fn amx_probe_reports_what_its_child_found() {
    use amx::probe::{check, Acc};
    if !avx2::available() {
        return;
    }
    let exact = |a: &QuantActs, t0, mr, w: &QuantPanels, p, acc: &mut Acc| {
        avx2::kernel(a, t0, mr, w, p, acc)
    };
    let off = |a: &QuantActs, t0, mr, w: &QuantPanels, p, acc: &mut Acc| {
        avx2::kernel(a, t0, mr, w, p, acc);
        acc[0][0] = f32::from_bits(acc[0][0].to_bits() ^ 1);
    };
    let crash = |_: &QuantActs, _, _, _: &QuantPanels, _, _: &mut Acc| std::process::abort();
    let panics = |_: &QuantActs, _, _, _: &QuantPanels, _, _: &mut Acc| panic!("in the probe");
    let slow = |a: &QuantActs, t0, mr, w: &QuantPanels, p, acc: &mut Acc| {
        for _ in 0..3 {
            avx2::kernel(a, t0, mr, w, p, acc);
        }
    };
    assert!(check(&exact, &slow).is_ok());
    for (tiles, why) in [
        (&slow as amx::probe::Kernel, "slower"),
        (&off, "disagreed"),
        (&crash, "failed"),
        (&panics, "failed"),
    ] {
        let err = check(tiles, &exact).unwrap_err();
        assert!(err.contains(why), "{err}");
    }
}
