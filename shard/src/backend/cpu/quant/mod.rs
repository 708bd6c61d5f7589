//! Integer-quantized matmul. Weights are small unsigned integers `q` with an f16 scale `d` and
//! offset `o` per group of G = 16 or 32 inputs (every GGUF quant type maps to this exactly, see
//! `tessera_formats::gguf::affine`); activations are quantized per group to int8 `qx` with scale
//! `dx`, and each group's products are summed in i32 before one scaling to f32:
//!
//! ```text
//! y[t, r] = Σ_g  d[r,g]·dx[t,g]·Σ_i q[r,i]·qx[t,i]  +  o[r,g]·dx[t,g]·Σ_i qx[t,i]
//! ```
//!
//! Layout (made once at load): panels of 16 output rows; in a panel, group after group; in a
//! group, "quads" of 4 consecutive inputs for all 16 rows side by side in one 64-byte line
//! (`row·4 + i%4`). One `vpdpbusd` of a line against a broadcast activation quad therefore feeds 16
//! row accumulators, with no horizontal sums. Values of at most 6 bits keep their low nibbles two
//! lines to one: line `c` holds quad `c` in its low nibbles and quad `c + G/8` in its high ones;
//! the 1–2 bits above the nibble (5- and 6-bit formats) follow in "plane" lines, where byte `i`
//! holds those bits of byte `i` of every quad (`plane_bit`). So the matrix is about as large as the
//! file it came from. Scales and offsets follow per (panel, group): 16 f16 scales, then 16 f16
//! offsets. Symmetric formats (Q8_0, Q4_0, Q5_0, Q3_K, Q6_K, IQ4: every offset is `−z·d` with the
//! zero point `z = 2^(bits−1)`) hold no offsets: two groups share a block and its line of 32
//! scales, and the kernels subtract `z·Σ qx` from each group's i32 sum instead, as llama.cpp's
//! integer dot products do:
//!
//! ```text
//! y[t, r] = Σ_g  d[r,g]·dx[t,g]·(Σ_i q[r,i]·qx[t,i] − z·Σ_i qx[t,i])
//! ```

/// Expands `$go!(GROUP, NIBBLES, HIGH)` for the layout of panels `$w`, so a kernel set is
/// compiled once per layout (defined before the kernel modules so they see it).
macro_rules! by_layout {
    ($w:expr, $go:ident) => {
        match ($w.group, $w.nibbles, $w.high) {
            (32, true, 0) => $go!(32, true, 0),
            (32, true, 1) => $go!(32, true, 1),
            (32, true, _) => $go!(32, true, 2),
            (32, false, _) => $go!(32, false, 0),
            (16, true, 0) => $go!(16, true, 0),
            (16, true, 1) => $go!(16, true, 1),
            (16, true, _) => $go!(16, true, 2),
            _ => $go!(16, false, 0),
        }
    };
}

mod amx;
mod avx2;
mod neon;
mod portable;
mod vnni;

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;
use tessera_formats::gguf::affine::Affine;

/// Output rows per panel: one 512-bit vector of i32/f32 lanes.
pub const ROWS: usize = 16;
/// Tokens per kernel call: accumulators for this many tokens stay in AVX-512's 32 registers
/// beside one group's eight weight lines.
pub const TOKENS: usize = 8;
/// Tokens per cache block: a block of quantized activations stays in L2 while panels stream past.
const TOKEN_BLOCK: usize = 64;

/// One cache line: blocks start on line boundaries so no 64-byte load straddles two lines.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A `[rows, cols]` matrix (PyTorch `[out, in]`) in the panel layout above; each block is one
/// group's quant lines followed by a line of 16 f16 scales and 16 f16 offsets, or two groups'
/// quant lines and a line of their 2 × 16 scales (symmetric), so a decode step reads one
/// sequential stream.
#[derive(Debug, Clone)]
pub struct QuantPanels {
    rows: usize,
    cols: usize,
    /// Inputs per (scale, offset) group: 16 or 32.
    group: usize,
    /// Groups per row, `cols / group`.
    groups: usize,
    /// Every value is < 2^bits (2..=8); the AVX2 kernels pick their i16 sums by it.
    bits: u32,
    /// Low nibbles two per byte (every value < 64), else one value per byte.
    nibbles: bool,
    /// Bits above the nibble (0–2), in plane lines after the nibble lines.
    high: usize,
    /// The zero point `z` of symmetric weights (offsets not stored), else 0.
    zero: i32,
    lines: Vec<Line>,
}

impl QuantPanels {
    /// Packs `a`, a row-major `[rows, cols]` tensor whose rows are whole groups.
    pub fn pack(rows: usize, cols: usize, a: &Affine) -> Result<Self, String> {
        let group = a.group;
        if !matches!(group, 16 | 32) || !cols.is_multiple_of(group) || !(1..=8).contains(&a.bits) {
            return Err(format!(
                "cannot pack groups of {group} with {} bits into rows of {cols}",
                a.bits
            ));
        }
        if a.q.len() != rows * cols || a.scale.len() * group != rows * cols {
            return Err(format!(
                "{} values and {} groups do not make a [{rows}, {cols}] matrix",
                a.q.len(),
                a.scale.len()
            ));
        }
        let nibbles = a.bits <= 6;
        let high = if nibbles {
            a.bits.saturating_sub(4) as usize
        } else {
            0
        };
        let mut packed = QuantPanels {
            rows,
            cols,
            group,
            groups: cols / group,
            bits: a.bits,
            nibbles,
            high,
            zero: symmetric_zero(a),
            lines: Vec::new(),
        };
        let (groups, per, quant_lines) = (cols / group, packed.per_block(), packed.quant_lines());
        let (block_lines, panel_lines) = (packed.block_lines(), packed.panel_lines());
        // Zeroed in order on one thread before the parallel packing: pages first touched by
        // the packing tasks instead made a 1B-shaped Q4_K_M model's 512-token prefill 15%
        // slower on a 2-core AMD EPYC (111 -> 95 tok/s), for 0.2 s less loading.
        packed.lines = vec![Line([0; 64]); rows.div_ceil(ROWS) * panel_lines];
        let quads = group / 4;
        let symmetric = packed.zero != 0;
        packed
            .lines
            .par_chunks_mut(panel_lines)
            .enumerate()
            .for_each(|(p, panel)| {
                for (b, block) in panel.chunks_exact_mut(block_lines).enumerate() {
                    let (quant, params) = block.split_at_mut(per * quant_lines);
                    let groups_here = quant.chunks_exact_mut(quant_lines).enumerate();
                    for (k, quant) in groups_here.take(groups - b * per) {
                        let g = b * per + k;
                        for r in 0..ROWS.min(rows - p * ROWS) {
                            let row = p * ROWS + r;
                            let values = &a.q[row * cols + g * group..][..group];
                            pack_values(values, r, nibbles, high, quads, quant);
                            let at = row * groups + g;
                            let mut param = |i: usize, v: f32| {
                                let bytes = f16::from_f32(v).to_ne_bytes();
                                params[0].0[2 * i..2 * i + 2].copy_from_slice(&bytes);
                            };
                            if symmetric {
                                param(k * ROWS + r, a.scale[at]);
                            } else {
                                param(r, a.scale[at]);
                                param(ROWS + r, a.offset[at]);
                            }
                        }
                    }
                }
            });
        Ok(packed)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (what one decode step streams).
    pub fn nbytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// Element `(r, c)` dequantized with the stored (f16) scale and offset.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let (lane, g, i) = (r % ROWS, c / self.group, c % self.group);
        let (quant, params) = self.block(r / ROWS, g);
        let (quad, t) = (i / 4, i % 4);
        let v = if self.nibbles {
            let lines = self.group / 8;
            let byte = quant[(quad % lines) * 64 + lane * 4 + t];
            let nibble = if quad >= lines {
                byte >> 4
            } else {
                byte & 0x0F
            };
            let above = if self.high > 0 {
                let (plane, bit) = plane_bit(quad, self.high);
                quant[(lines + plane) * 64 + lane * 4 + t] >> bit & ((1 << self.high) - 1)
            } else {
                0
            };
            nibble | above << 4
        } else {
            quant[quad * 64 + lane * 4 + t]
        };
        let d = f16::from_bits(params[lane]).to_f32();
        if self.zero != 0 {
            d * (v as i32 - self.zero) as f32
        } else {
            d * v as f32 + f16::from_bits(params[ROWS + lane]).to_f32()
        }
    }

    /// Row `r` dequantized into `out` (`cols` values): embedding lookups from a tied lm_head.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        for (c, o) in out[..self.cols].iter_mut().enumerate() {
            *o = self.get(r, c);
        }
    }

    /// Panel `p` alone with one value per byte (nibbles and plane bits joined) into `out`, whose
    /// lines are reused: prefill multiplies a panel by many tokens, so it pays to join the bits
    /// once per panel rather than in every kernel call.
    fn expand_panel(&self, p: usize, out: &mut QuantPanels, kernels: Kernels) {
        *out = QuantPanels {
            rows: ROWS,
            nibbles: false,
            high: 0,
            lines: std::mem::take(&mut out.lines),
            ..*self
        };
        out.lines.resize(out.panel_lines(), Line([0; 64]));
        for g in 0..self.groups {
            let (quant, _) = self.block(p, g);
            let ((at, params), len) = (out.place(0, g), out.quant_lines());
            let dst = &mut out.lines[at..at + len];
            macro_rules! go {
                ($g:literal, $nib:literal, $hb:literal) => {
                    unpack_group::<$g, $nib, $hb>(quant, dst)
                };
            }
            match kernels {
                Kernels::Amx | Kernels::Vnni | Kernels::Avx2 if self.nibbles => {
                    avx2::join_group(quant, self.group, self.high, dst)
                }
                _ => by_layout!(self, go),
            }
            out.lines[params] = self.lines[self.place(p, g).1];
        }
    }

    /// Groups per block: two when blocks hold scales only (32 f16 fill their line), else one.
    #[inline(always)]
    fn per_block(&self) -> usize {
        if self.zero != 0 {
            2
        } else {
            1
        }
    }

    /// Lines of one block: `per_block()` groups' values and a parameter line.
    #[inline(always)]
    fn block_lines(&self) -> usize {
        self.per_block() * self.quant_lines() + 1
    }

    /// Lines of one group's values: nibbles and planes, or bytes.
    #[inline(always)]
    fn quant_lines(&self) -> usize {
        if self.nibbles {
            ROWS * self.group / 2 / 64 + (self.group / 4 * self.high).div_ceil(8)
        } else {
            ROWS * self.group / 64
        }
    }

    /// Lines of one panel: its blocks (written out per case, so no division by a variable).
    #[inline(always)]
    fn panel_lines(&self) -> usize {
        if self.zero != 0 {
            self.groups.div_ceil(2) * self.block_lines()
        } else {
            self.groups * self.block_lines()
        }
    }

    /// Where group `g` of panel `p` lies: the index of its first quant line and of its block's
    /// parameter line.
    #[inline(always)]
    fn place(&self, p: usize, g: usize) -> (usize, usize) {
        let (quant_lines, panel) = (self.quant_lines(), p * self.panel_lines());
        if self.zero != 0 {
            let block = panel + g / 2 * self.block_lines();
            (block + g % 2 * quant_lines, block + 2 * quant_lines)
        } else {
            let block = panel + g * self.block_lines();
            (block, block + quant_lines)
        }
    }

    /// The quantized bytes of group `g` in panel `p`, and its f16 parameters: 16 scales, then 16
    /// offsets unless the panels are symmetric; both start on a 32-byte boundary.
    #[inline(always)]
    fn block(&self, p: usize, g: usize) -> (&[u8], &[u16]) {
        let (at, params) = self.place(p, g);
        let quant = &self.lines[at..at + self.quant_lines()];
        let (first, len) = if self.zero != 0 {
            (g % 2 * ROWS, ROWS)
        } else {
            (0, 2 * ROWS)
        };
        let params = &self.lines[params].0[2 * first..2 * (first + len)];
        // SAFETY: `Line` is 64 plain bytes (repr C, no padding), so its slices are byte slices,
        // and the parameters start 0 or 32 bytes into a 64-byte aligned line, aligned for u16.
        unsafe {
            (
                std::slice::from_raw_parts(quant.as_ptr() as *const u8, quant.len() * 64),
                std::slice::from_raw_parts(params.as_ptr() as *const u16, len),
            )
        }
    }

    /// What token `t`'s i32 sum over group `g` starts from in a kernel that multiplies `v − bias`
    /// (AVX2 and NEON take bytes signed, `bias` 128, and others as they are, `bias` 0), so that
    /// it comes out as `Σ (v − zero)·qx`: `(bias − zero)·Σ qx`.
    #[inline(always)]
    fn sum_start(&self, acts: &QuantActs, t: usize, g: usize, bias: i32) -> i32 {
        if bias == self.zero {
            0
        } else {
            (bias - self.zero) * acts.total(t, g)
        }
    }

    /// Whether the f16 parameters hold offsets (asymmetric formats), added as `o·dx·Σ qx`.
    #[inline(always)]
    fn has_offsets(&self) -> bool {
        self.zero == 0
    }
}

/// The zero point of `a` if every group's offset is `−z·scale` with `z = 2^(bits−1)` as stored
/// (f16), else 0: the symmetric formats, whose blocks then hold scales only.
fn symmetric_zero(a: &Affine) -> i32 {
    let zero = 1i32 << (a.bits - 1);
    let f16_exact = |v: f32| f16::from_f32(v).to_f32();
    let symmetric = a
        .scale
        .iter()
        .zip(&a.offset)
        .all(|(&d, &o)| f16_exact(o) == -(zero as f32) * f16_exact(d));
    if symmetric {
        zero
    } else {
        0
    }
}

/// ORs row `r`'s `values` (one group) into a block's quant lines: nibbles with their plane
/// bits, or bytes.
fn pack_values(
    values: &[u8],
    r: usize,
    nibbles: bool,
    high: usize,
    quads: usize,
    quant: &mut [Line],
) {
    // A quad's four values as one word; shifts and masks keep each byte's bits in that byte.
    let word = |j: usize| u32::from_ne_bytes(values[4 * j..][..4].try_into().unwrap());
    let or_word = |line: &mut Line, word: u32| {
        let dst: &mut [u8; 4] = (&mut line.0[r * 4..r * 4 + 4]).try_into().unwrap();
        *dst = (u32::from_ne_bytes(*dst) | word).to_ne_bytes();
    };
    if nibbles {
        // A byte's bits above its nibble (each value < 2^(4 + high)).
        let above_mask = 0x0101_0101 * ((1u32 << high) - 1);
        for c in 0..quads / 2 {
            let (lo, hi) = (word(c), word(c + quads / 2));
            let nibs = lo & 0x0F0F_0F0F | (hi & 0x0F0F_0F0F) << 4;
            or_word(&mut quant[c], nibs);
            if high > 0 {
                // The bits above each nibble, at their place in the plane.
                for (j, w) in [(c, lo), (c + quads / 2, hi)] {
                    let (plane, bit) = plane_bit(j, high);
                    let above = (w >> 4 & above_mask) << bit;
                    or_word(&mut quant[quads / 2 + plane], above);
                }
            }
        }
    } else {
        for (line, j) in quant.iter_mut().zip(0..quads) {
            or_word(line, word(j));
        }
    }
}

/// Where quad `j`'s bits above the nibble lie: their plane line (counted from the first plane),
/// and the bit of each byte holding the lowest of them (the other `high − 1` follow it). Byte
/// `i` of a plane holds those bits for byte `i` of each quad in turn, eight bits a line.
#[inline(always)]
const fn plane_bit(j: usize, high: usize) -> (usize, usize) {
    (j * high / 8, j * high % 8)
}

/// A group's quads as whole bytes into `out[..G/4]`, in the packed order (`out[j]` byte `r·4 + t`
/// is row r's input `4j + t`): a nibble block keeps quad `c` in the low nibbles of line `c` and
/// quad `c + G/8` in its high ones, and the bits above them in its planes.
#[inline(always)]
fn unpack_group<const G: usize, const NIB: bool, const HB: usize>(block: &[u8], out: &mut [Line]) {
    let lines = if NIB { G / 8 } else { G / 4 };
    for (j, quad) in out[..G / 4].iter_mut().enumerate() {
        let line: &[u8; 64] = block[(j % lines) * 64..][..64].try_into().unwrap();
        match (NIB, j < lines) {
            (false, _) => quad.0 = *line,
            (true, true) => quad.0.iter_mut().zip(line).for_each(|(q, b)| *q = b & 0x0F),
            (true, false) => quad.0.iter_mut().zip(line).for_each(|(q, b)| *q = b >> 4),
        }
        if HB > 0 {
            let (plane, bit) = plane_bit(j, HB);
            let above: &[u8; 64] = block[(lines + plane) * 64..][..64].try_into().unwrap();
            for (q, a) in quad.0.iter_mut().zip(above) {
                *q |= (a >> bit & ((1 << HB) - 1)) << 4;
            }
        }
    }
}

/// Activations quantized per group: `q` is `[n, k]` int8 in [-127, 127], `scale`, `sum` and
/// `total` are `[n, k / group]` (`dx`, `dx·Σ qx` for the offset term, and `Σ qx` itself).
pub struct QuantActs {
    k: usize,
    group: usize,
    /// `k / group`, kept so kernels index without a division.
    groups: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    sum: Vec<f32>,
    total: Vec<i32>,
}

impl QuantActs {
    /// Quantizes `n` rows of `k` values (k a multiple of `group`) to the nearest of 255 levels.
    pub fn new(x: &[f32], n: usize, k: usize, group: usize) -> Self {
        let groups = k / group;
        let mut acts = QuantActs {
            k,
            group,
            groups,
            q: vec![0i8; n * k],
            scale: vec![0f32; n * groups],
            sum: vec![0f32; n * groups],
            total: vec![0; n * groups],
        };
        // Rows in parallel: a 512-token prefill quantizes 300k values per matmul.
        let rows = QUANTIZE_ROWS.min(n.max(1));
        x[..n * k]
            .par_chunks(rows * k)
            .zip(acts.q.par_chunks_mut(rows * k))
            .zip(acts.scale.par_chunks_mut(rows * groups))
            .zip(acts.sum.par_chunks_mut(rows * groups))
            .zip(acts.total.par_chunks_mut(rows * groups))
            .for_each(|((((x, q), scale), sum), total)| {
                quantize(
                    x,
                    group,
                    Quantized {
                        q,
                        scale,
                        sum,
                        total,
                    },
                )
            });
        acts
    }

    /// Token `t`'s int8 values of group `g`, its `dx` and `dx·Σ qx`.
    #[inline(always)]
    fn group(&self, t: usize, g: usize) -> (&[i8], f32, f32) {
        let at = t * self.k + g * self.group;
        (
            &self.q[at..at + self.group],
            self.scale[t * self.groups + g],
            self.sum[t * self.groups + g],
        )
    }

    /// Token `t`'s `Σ qx` over group `g`.
    #[inline(always)]
    fn total(&self, t: usize, g: usize) -> i32 {
        self.total[t * self.groups + g]
    }
}

/// Token rows one quantization task takes.
const QUANTIZE_ROWS: usize = 16;

/// Where some rows' quantized activations go.
struct Quantized<'a> {
    q: &'a mut [i8],
    scale: &'a mut [f32],
    sum: &'a mut [f32],
    total: &'a mut [i32],
}

/// Fills `out` from `x`, group by group.
fn quantize(x: &[f32], group: usize, out: Quantized) {
    #[cfg(target_arch = "x86_64")]
    let fast = group == 32 && avx2::available();
    for ((((xg, qg), s), sm), tm) in x
        .chunks_exact(group)
        .zip(out.q.chunks_exact_mut(group))
        .zip(out.scale)
        .zip(out.sum)
        .zip(out.total)
    {
        #[cfg(target_arch = "x86_64")]
        let (amax, total) = if fast {
            // SAFETY: AVX2 is present and both slices hold 32 values.
            unsafe { avx2::levels32(xg, qg) }
        } else {
            levels(xg, qg)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (amax, total) = levels(xg, qg);
        let d = amax / 127.0;
        // Stored as f16, as llama.cpp's q8_0/q8_1 activation blocks hold them: the same
        // numbers, so greedy ids track llama.cpp's own at near-ties.
        *s = f16::from_f32(d).to_f32();
        *sm = f16::from_f32(d * total as f32).to_f32();
        *tm = total;
    }
}

/// One group's int8 levels `round(x · 127 / amax)` into `q`, halves away from zero (`trunc(y ±
/// 0.5)`, the same operations as the AVX2 path): rows dequantized from Q8_0 embeddings hit exact
/// halves often, and this rounding follows llama.cpp's greedy ids further than ties-to-even
/// (`shard/tests/llama_cpp_greedy.rs`: 56 against 45 of 112). Returns `amax` and the levels' sum.
fn levels(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut total = 0;
    for (o, &v) in q.iter_mut().zip(x) {
        let y = v * inv;
        let r = (y + 0.5f32.copysign(y)).trunc() as i32;
        *o = r as i8;
        total += r;
    }
    (amax, total)
}

/// The instruction set the integer kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// AMX-INT8 tiles for prefill, AVX-512 VNNI for decode (`amx`).
    Amx,
    /// AVX-512 VNNI (`vpdpbusd` on 64-byte lines).
    Vnni,
    /// AVX2 (`vpmaddubsw`), the floor of x86-64 servers since 2013.
    Avx2,
    /// NEON with the dot-product extension (`sdot`), Armv8.2 and later.
    Neon,
    /// Plain Rust the compiler vectorizes for the build target (plain NEON on older Arm cores).
    Portable,
}

impl Kernels {
    /// What this CPU supports, capped by `cap()`; decided once per process.
    pub fn chosen() -> Kernels {
        static CHOSEN: OnceLock<Kernels> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Kernels::best_supported();
            match (Kernels::cap(), best) {
                (Some(Kernels::Portable), _) => Kernels::Portable,
                (Some(Kernels::Avx2), Kernels::Vnni | Kernels::Amx) => Kernels::Avx2,
                (Some(Kernels::Vnni), Kernels::Amx) => Kernels::Vnni,
                _ => best,
            }
        })
    }

    /// The cap `TESSERA_CPU_KERNELS=vnni|avx2|portable` puts on every CPU kernel, integer and float
    /// (for measuring the paths older CPUs take); `auto` or unset: none, anything else is warned
    /// of once and ignored.
    pub fn cap() -> Option<Kernels> {
        static CAP: OnceLock<Option<Kernels>> = OnceLock::new();
        *CAP.get_or_init(|| {
            match std::env::var("TESSERA_CPU_KERNELS")
                .unwrap_or_default()
                .as_str()
            {
                "portable" => Some(Kernels::Portable),
                "vnni" => Some(Kernels::Vnni),
                "avx2" => Some(Kernels::Avx2),
                "" | "auto" => None,
                other => {
                    tracing::warn!(
                        "TESSERA_CPU_KERNELS={other} is not one of auto, vnni, avx2, portable; \
                         using the best kernels this CPU has"
                    );
                    None
                }
            }
        })
    }

    fn best_supported() -> Kernels {
        if amx::available() {
            Kernels::Amx
        } else if vnni::available() {
            Kernels::Vnni
        } else if avx2::available() {
            Kernels::Avx2
        } else if neon::available() {
            Kernels::Neon
        } else {
            Kernels::Portable
        }
    }

    /// Tokens one tile of this set multiplies by a group's weights after joining their plane
    /// bits: a matmul with more tokens per block joins them once per panel instead
    /// (`QuantPanels::expand_panel`).
    fn plane_tile_tokens(self) -> usize {
        match self {
            Kernels::Amx | Kernels::Vnni | Kernels::Portable => TOKENS,
            Kernels::Avx2 => avx2::PLANE_STEP,
            Kernels::Neon => neon::STEP,
        }
    }

    /// Every kernel set this CPU can run (tests compare them all).
    pub fn supported() -> Vec<Kernels> {
        let mut all = vec![Kernels::Portable];
        if avx2::available() {
            all.push(Kernels::Avx2);
        }
        if vnni::available() {
            all.push(Kernels::Vnni);
        }
        if amx::available() {
            all.push(Kernels::Amx);
        }
        if neon::available() {
            all.push(Kernels::Neon);
        }
        all
    }
}

/// `acc[i][r] = y[t0 + i, p·16 + r]` for `mr ≤ TOKENS` tokens.
type KernelFn = fn(&QuantActs, usize, usize, &QuantPanels, usize, &mut [[f32; ROWS]; TOKENS]);

fn kernel_fn(kernels: Kernels) -> KernelFn {
    match kernels {
        Kernels::Amx => amx::kernel,
        Kernels::Vnni => vnni::kernel,
        Kernels::Avx2 => avx2::kernel,
        Kernels::Neon => neon::kernel,
        Kernels::Portable => portable::kernel,
    }
}

/// Raw output pointer shared by tasks that write disjoint `[token, column]` tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of (token block, panel) tiles of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The output element at offset `i` (a method, so closures capture the whole `Send` wrapper).
    ///
    /// # Safety
    /// `i` must lie inside the output.
    unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// `out[t, j] = Σ_c x[t, c] · W[j, c]` for `n` tokens: `x` is `[n, cols]`, `out` is `[n, rows]`,
/// and `W` is `blocks` stacked by rows (one block, or the parts of a fused matrix stored in
/// different formats).
pub fn matmul(x: &[f32], n: usize, blocks: &[QuantPanels], out: &mut [f32]) {
    matmul_with(x, n, blocks, out, Kernels::chosen());
}

/// Element `(r, c)` of `blocks` stacked by rows.
pub fn get(blocks: &[QuantPanels], mut r: usize, c: usize) -> f32 {
    for w in blocks {
        if r < w.rows {
            return w.get(r, c);
        }
        r -= w.rows;
    }
    panic!("row {r} past the last block");
}

/// `matmul` on an explicit kernel set (tests and benchmarks). One parallel pass covers every
/// block's panels; activations are quantized once per group size among the blocks.
pub fn matmul_with(x: &[f32], n: usize, blocks: &[QuantPanels], out: &mut [f32], kernels: Kernels) {
    let k = blocks.first().map_or(0, |w| w.cols);
    let m: usize = blocks.iter().map(|w| w.rows).sum();
    assert!(
        blocks.iter().all(|w| w.cols == k) && x.len() >= n * k && out.len() >= n * m,
        "quant matmul: blocks of unequal width, or buffers too small"
    );
    if n == 0 || m == 0 {
        return;
    }
    let mut acts: Vec<QuantActs> = Vec::with_capacity(2);
    for w in blocks {
        if !acts.iter().any(|a| a.group == w.group) {
            acts.push(QuantActs::new(x, n, k, w.group));
        }
    }
    let kernel = kernel_fn(kernels);
    // (block, panel in it, first output column) of every panel.
    let mut panels = Vec::with_capacity(m.div_ceil(ROWS) + blocks.len());
    let mut column = 0;
    for (b, w) in blocks.iter().enumerate() {
        panels.extend((0..w.rows.div_ceil(ROWS)).map(|p| (b, p, column + p * ROWS)));
        column += w.rows;
    }
    let tblocks = n.div_ceil(TOKEN_BLOCK);
    let want = rayon::current_num_threads().max(1) * 4;
    let per_group = panels
        .len()
        .div_ceil(want.div_ceil(tblocks).clamp(1, panels.len()));
    let groups = panels.len().div_ceil(per_group);
    let ptr = OutPtr(out.as_mut_ptr());
    let scratch = || QuantPanels {
        lines: Vec::new(),
        ..blocks[0]
    };
    (0..tblocks * groups)
        .into_par_iter()
        .for_each_init(scratch, |expanded, task| {
            let (tb, g) = (task / groups, task % groups);
            let tokens = tb * TOKEN_BLOCK..((tb + 1) * TOKEN_BLOCK).min(n);
            for &(b, p, column) in &panels[g * per_group..((g + 1) * per_group).min(panels.len())] {
                let w = &blocks[b];
                let acts = acts
                    .iter()
                    .find(|a| a.group == w.group)
                    .expect("quantized above");
                let width = ROWS.min(w.rows - p * ROWS);
                // Plane bits (and, for AMX's tiles, nibbles) are joined into bytes once per
                // panel for token blocks longer than one tile.
                let joins = w.high > 0 || (kernels == Kernels::Amx && w.nibbles);
                let (panel, at) = if joins && tokens.len() > kernels.plane_tile_tokens() {
                    w.expand_panel(p, expanded, kernels);
                    (&*expanded, 0)
                } else {
                    (w, p)
                };
                let mut acc = [[0f32; ROWS]; TOKENS];
                let mut t0 = tokens.start;
                while t0 < tokens.end {
                    let mr = TOKENS.min(tokens.end - t0);
                    kernel(acts, t0, mr, panel, at, &mut acc);
                    for (i, row) in acc.iter().take(mr).enumerate() {
                        // SAFETY: token t0+i < n and columns column..column+width < m lie inside
                        // `out`, and no other task writes this (token, panel) tile.
                        unsafe {
                            let dst = ptr.at((t0 + i) * m + column);
                            if width == ROWS {
                                // A whole row of the tile: a fixed-size move, not a memcpy call.
                                dst.cast::<[f32; ROWS]>().write_unaligned(*row);
                            } else {
                                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, width);
                            }
                        }
                    }
                    t0 += mr;
                }
            }
        });
}

#[cfg(test)]
mod tests;
