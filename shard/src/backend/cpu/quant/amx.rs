//! AMX-INT8 prefill kernel: one `tdpbsud` multiplies a tile of tokens' int8 activations (A:
//! `mr` rows of one group's G bytes, read in place with the activations' row stride) by a group of
//! a panel's weights (B: the group's G/4 lines as packed, each line one VNNI quad of 16 rows, so
//! the panel layout already is AMX's B layout) into 16 × `mr` i32 sums (C), which are scaled in
//! f32 exactly as the VNNI kernel scales its own: the two agree bit for bit, so which one a
//! token meets never changes its result. Weights must be one byte per value: nibble panels are
//! joined once per panel for prefill (`QuantPanels::expand_panel`), and tiles of fewer than
//! `TOKENS` tokens (decode, a prefill's tail) and panels as stored take the VNNI kernel.
//!
//! AMX has never run in this project's tests (no AMX host), so `available()` trusts it only
//! after a probe in a child process (a fault there cannot take the shard down) has found the
//! tiles agree with the VNNI kernel bit for bit and multiply a prefill-shaped block faster. The
//! tile logic itself is tested everywhere against an emulation of the four instructions it uses
//! (`Emulated`, written from the instructions' definitions in Intel's SDM).

use std::sync::OnceLock;

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::{vnni, QuantActs, QuantPanels, ROWS, TOKENS};

/// One call's C tile: `mr` tokens' i32 sums for the panel's 16 rows, rows 64 bytes apart as
/// `tilestored` writes them.
type Sums = [[i32; ROWS]; TOKENS];

/// What the kernel needs from the tile unit: shape the tiles, then per group C = A·B. Tiles come
/// in two sets (C, A, B), which consecutive groups alternate, so the tile unit multiplies one
/// group while the cores scale the last: the hardware does not rename tiles.
trait Tiles {
    /// Shapes each set's C (`mr` × 64 bytes), A (`mr` × `group` bytes) and B (`group / 4` × 64
    /// bytes).
    ///
    /// # Safety
    /// The tile unit must be usable (`Hardware`: `available()`).
    unsafe fn shape(&mut self, mr: usize, group: usize);

    /// `c[m][n] = Σ_k a[m·stride + k] · b[(k / 4)·64 + 4n + k % 4]` over the shaped `mr` rows and
    /// `group` inputs: signed activations times unsigned weights, on tile set `set` (0 or 1).
    ///
    /// # Safety
    /// `a` must hold `mr` rows `stride` bytes apart of `group` bytes each, `b` `group / 4` lines.
    unsafe fn product(
        &mut self,
        set: usize,
        a: *const i8,
        stride: usize,
        b: *const u8,
        c: &mut Sums,
    );
}

/// Whether the CPU has AMX-INT8 and AVX-512 VNNI, Linux lets this process use the tiles, and the
/// probe found them exact and faster than VNNI; decided once per process.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if !(hardware::present() && vnni::available()) {
            return false;
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let probed = hardware::permit().and_then(|()| probe::run());
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        let probed: Result<(), String> = Err("AMX is used on Linux only".into());
        match probed {
            Ok(()) => {
                tracing::info!(
                    "AMX-INT8 tiles multiply prefill (probed: exact and faster than VNNI)"
                );
                true
            }
            Err(why) => {
                tracing::warn!("AMX-INT8 is present but not used: {why}; prefill takes VNNI");
                false
            }
        }
    })
}

/// Fills `acc[..mr]` with tokens `t0..t0 + mr` against panel `p`. Only called after `available()`.
pub fn kernel(
    acts: &QuantActs,
    t0: usize,
    mr: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]; TOKENS],
) {
    if w.nibbles || mr < TOKENS {
        return vnni::kernel(acts, t0, mr, w, p, acc);
    }
    assert!(available(), "the AMX kernel needs AMX-INT8");
    // SAFETY: `available()` holds (AVX-512 included); `tile` reads only inside `w` and `acts`.
    unsafe { hardware::tile(acts, t0, mr, w, p, acc) }
}

/// The kernel on any tile unit: per group one product (the next group's issued before this
/// one is scaled), then per token `f = fma(f32(sum + start), d·dx, f)` and, with offsets,
/// `f = fma(o, dx·Σqx, f)`: the VNNI kernel's operations in its order.
///
/// # Safety
/// `tiles` must be usable; `w` holds one byte per value.
#[inline(always)]
unsafe fn tile<T: Tiles>(
    tiles: &mut T,
    acts: &QuantActs,
    t0: usize,
    mr: usize,
    w: &QuantPanels,
    p: usize,
    acc: &mut [[f32; ROWS]; TOKENS],
) {
    debug_assert!(!w.nibbles && (1..=TOKENS).contains(&mr));
    tiles.shape(mr, w.group);
    let mut f = [[0f32; ROWS]; TOKENS];
    let mut sums: [Sums; 2] = [[[0; ROWS]; TOKENS]; 2];
    let (mut d, mut off) = ([0f32; ROWS], [0f32; ROWS]);
    // Group g's sums into `sums[g % 2]` on tile set g % 2.
    macro_rules! product {
        ($g:expr) => {{
            let g = $g;
            let a = acts.q.as_ptr().add(t0 * acts.k + g * w.group);
            let b = w.block(p, g).0.as_ptr();
            tiles.product(g % 2, a, acts.k, b, &mut sums[g % 2]);
        }};
    }
    product!(0);
    for g in 0..w.groups {
        if g + 1 < w.groups {
            product!(g + 1);
        }
        let (sums, params) = (&sums[g % 2], w.block(p, g).1);
        params[..ROWS]
            .reinterpret_cast::<f16>()
            .convert_to_f32_slice(&mut d);
        for (i, (fi, si)) in f.iter_mut().zip(sums).take(mr).enumerate() {
            let (_, dx, _) = acts.group(t0 + i, g);
            let start = w.sum_start(acts, t0 + i, g, 0);
            for ((o, &s), &dr) in fi.iter_mut().zip(si).zip(&d) {
                *o = ((s + start) as f32).mul_add(dr * dx, *o);
            }
        }
        if w.has_offsets() {
            params[ROWS..2 * ROWS]
                .reinterpret_cast::<f16>()
                .convert_to_f32_slice(&mut off);
            for (i, fi) in f.iter_mut().take(mr).enumerate() {
                let (_, _, sx) = acts.group(t0 + i, g);
                for (o, &or) in fi.iter_mut().zip(&off) {
                    *o = or.mul_add(sx, *o);
                }
            }
        }
    }
    acc[..mr].copy_from_slice(&f[..mr]);
}

/// The tile unit itself: `ldtilecfg`, `tilezero`, `tileloadd`, `tdpbsud`, `tilestored`.
mod hardware {
    use super::{QuantActs, QuantPanels, Sums, Tiles, ROWS, TOKENS};

    /// Whether CPUID reports AMX-TILE and AMX-INT8 (leaf 7, EDX bits 24 and 25).
    pub fn present() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{__cpuid, __cpuid_count};
            // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only if the CPU has it.
            // (Safe functions in recent Rust, unsafe in the 1.89 this workspace supports.)
            #[allow(unused_unsafe)]
            unsafe {
                __cpuid(0).eax >= 7 && {
                    let edx = __cpuid_count(7, 0).edx;
                    edx & (1 << 24) != 0 && edx & (1 << 25) != 0
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`),
    /// without which the first tile instruction faults.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    pub fn permit() -> Result<(), String> {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!(
                "Linux refused the tile state ({})",
                std::io::Error::last_os_error()
            ))
        }
    }

    /// The 64-byte tile configuration `ldtilecfg` reads (palette 1): tiles 0, 1, 2 are set 0's
    /// C, A, B and tiles 3, 4, 5 set 1's; the other two stay unused (0 rows, 0 bytes).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    std::thread_local! {
        /// The (`mr`, group) this thread's tiles are shaped for, 0 if none: `ldtilecfg` also
        /// zeroes every tile, so it runs only when the shape changes.
        static SHAPED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    pub struct Hardware;

    impl Tiles for Hardware {
        unsafe fn shape(&mut self, mr: usize, group: usize) {
            let key = mr << 8 | group;
            if SHAPED.get() == key {
                return;
            }
            let mut config = Config {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [0; 16],
                rows: [0; 16],
            };
            // Tiles 0-2 and 3-5: C, A, B of each set.
            let (c, a, b) = (mr as u8, mr as u8, (group / 4) as u8);
            config.colsb[..6].copy_from_slice(&[64, group as u16, 64, 64, group as u16, 64]);
            config.rows[..6].copy_from_slice(&[c, a, b, c, a, b]);
            #[cfg(target_arch = "x86_64")]
            std::arch::asm!(
                "ldtilecfg [{config}]",
                config = in(reg) &config as *const Config,
                options(nostack, readonly)
            );
            SHAPED.set(key);
        }

        unsafe fn product(
            &mut self,
            set: usize,
            a: *const i8,
            stride: usize,
            b: *const u8,
            c: &mut Sums,
        ) {
            /// tilezero C, tileloadd A and B, tdpbsud, tilestored C, on tiles `$c`, `$a`, `$b`.
            #[cfg(target_arch = "x86_64")]
            macro_rules! product {
                ($c:literal, $a:literal, $b:literal) => {
                    std::arch::asm!(
                        concat!("tilezero tmm", $c),
                        concat!("tileloadd tmm", $a, ", [{a} + {stride}*1]"),
                        concat!("tileloadd tmm", $b, ", [{b} + {line}*1]"),
                        concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $b),
                        concat!("tilestored [{c} + {line}*1], tmm", $c),
                        a = in(reg) a,
                        stride = in(reg) stride,
                        b = in(reg) b,
                        line = in(reg) 64usize,
                        c = in(reg) c.as_mut_ptr(),
                        options(nostack)
                    )
                };
            }
            #[cfg(target_arch = "x86_64")]
            if set == 0 {
                product!("0", "1", "2")
            } else {
                product!("3", "4", "5")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (set, a, stride, b, c);
                unreachable!("AMX exists only on x86_64");
            }
        }
    }

    /// `super::tile` on the tile unit, compiled for AVX-512 so its f32 scaling runs 16 lanes wide.
    ///
    /// # Safety
    /// `super::available()` (or, in the probe, `permit()` and `present()`) must hold.
    #[cfg_attr(
        target_arch = "x86_64",
        target_feature(enable = "avx512f,avx512bw,fma,f16c")
    )]
    pub unsafe fn tile(
        acts: &QuantActs,
        t0: usize,
        mr: usize,
        w: &QuantPanels,
        p: usize,
        acc: &mut [[f32; ROWS]; TOKENS],
    ) {
        super::tile(&mut Hardware, acts, t0, mr, w, p, acc)
    }
}

/// The probe `available()` runs before trusting the tiles.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) mod probe {
    use std::time::{Duration, Instant};

    use half::f16;
    use tessera_formats::gguf::affine::Affine;

    use super::super::{vnni, QuantActs, QuantPanels, ROWS, TOKENS};
    use super::hardware;

    pub(in super::super) type Acc = [[f32; ROWS]; TOKENS];

    /// A kernel's signature (`super::super::KernelFn`, as a trait object for closures).
    pub(in super::super) type Kernel<'a> =
        &'a dyn Fn(&QuantActs, usize, usize, &QuantPanels, usize, &mut Acc);

    /// Weights, activations and their token count.
    type Case = (QuantPanels, QuantActs, usize);

    /// How the child process reports.
    const EXACT_AND_FASTER: i32 = 0;
    const SLOWER: i32 = 3;
    const DIFFERENT: i32 = 4;
    const PANICKED: i32 = 5;

    /// Multiplies prefill-shaped blocks (asymmetric bytes in groups of 32, symmetric in groups of
    /// 16, full and ragged token tiles) with the tiles in a child process, compares every output
    /// bit with the VNNI kernel's, then times both on the first block.
    pub fn run() -> Result<(), String> {
        let tiles = |acts: &QuantActs, t0, mr, w: &QuantPanels, p, acc: &mut Acc| {
            // SAFETY: `available()` found the tiles present and permitted before probing.
            unsafe { hardware::tile(acts, t0, mr, w, p, acc) }
        };
        check(&tiles, &vnni::kernel)
    }

    /// `run` for any pair of kernels: `Ok` if `tiles` agrees with `reference` bit for bit and
    /// multiplies faster, run in a child process so that a fault in `tiles` is only reported.
    pub(in super::super) fn check(tiles: Kernel, reference: Kernel) -> Result<(), String> {
        let cases = [
            case(256, 1024, 32, false, 64)?,
            case(48, 256, 16, true, 13)?,
        ];
        let want: Vec<Vec<Acc>> = cases.iter().map(|c| outputs(c, reference)).collect();
        let mut got = want.clone();
        // SAFETY: the child runs only the kernels, on memory allocated above (no allocation, no
        // locks), and leaves with `_exit`; the parent waits for it and reads its status.
        let status = unsafe {
            match libc::fork() {
                -1 => return Err("the probe process could not start".into()),
                0 => {
                    // A panic must not unwind into the copy of the shard the child is.
                    let work = || child(&cases, &want, &mut got, tiles, reference);
                    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
                    libc::_exit(code.unwrap_or(PANICKED))
                }
                pid => loop {
                    let mut status = 0;
                    match libc::waitpid(pid, &mut status, 0) {
                        done if done == pid => break status,
                        -1 if std::io::Error::last_os_error().kind()
                            == std::io::ErrorKind::Interrupted => {}
                        _ => return Err("the probe process was lost".into()),
                    }
                },
            }
        };
        match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
            (true, EXACT_AND_FASTER) => Ok(()),
            (true, SLOWER) => Err("its tiles multiplied slower than VNNI".into()),
            (true, DIFFERENT) => Err("its tiles disagreed with the VNNI kernel".into()),
            _ => Err(format!(
                "the probe process failed (wait status {status:#x})"
            )),
        }
    }

    /// The child's work: `EXACT_AND_FASTER`, `SLOWER` or `DIFFERENT`.
    fn child(
        cases: &[Case],
        want: &[Vec<Acc>],
        got: &mut [Vec<Acc>],
        tiles: Kernel,
        reference: Kernel,
    ) -> i32 {
        for ((case, want), got) in cases.iter().zip(want).zip(got.iter_mut()) {
            fill(case, tiles, got);
            if !same_bits(want, got) {
                return DIFFERENT;
            }
        }
        let mut time = |kernel: Kernel| {
            (0..5).fold(Duration::MAX, |best, _| {
                let start = Instant::now();
                fill(&cases[0], kernel, &mut got[0]);
                best.min(start.elapsed())
            })
        };
        if time(tiles) < time(reference) {
            EXACT_AND_FASTER
        } else {
            SLOWER
        }
    }

    /// Whether two outputs agree bit for bit (no allocation: the child calls it).
    fn same_bits(a: &[Acc], b: &[Acc]) -> bool {
        let (a, b) = (a.iter().flatten().flatten(), b.iter().flatten().flatten());
        a.zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// `kernel` over every (panel, token tile) of `case`, into `out` in that order.
    fn fill((w, acts, n): &Case, kernel: Kernel, out: &mut [Acc]) {
        let mut tiles = out.iter_mut();
        for p in 0..w.rows.div_ceil(ROWS) {
            for t0 in (0..*n).step_by(TOKENS) {
                let acc = tiles
                    .next()
                    .expect("one output tile per (panel, token tile)");
                kernel(acts, t0, TOKENS.min(n - t0), w, p, acc);
            }
        }
    }

    fn outputs(case: &Case, kernel: Kernel) -> Vec<Acc> {
        let tiles = case.0.rows.div_ceil(ROWS) * case.2.div_ceil(TOKENS);
        let mut out = vec![[[0f32; ROWS]; TOKENS]; tiles];
        fill(case, kernel, &mut out);
        out
    }

    /// Pseudo-random 8-bit weights `[rows, cols]` in groups of `group` and `n` tokens.
    fn case(
        rows: usize,
        cols: usize,
        group: usize,
        symmetric: bool,
        n: usize,
    ) -> Result<Case, String> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        let q: Vec<u8> = (0..rows * cols).map(|_| next() as u8).collect();
        let f16_exact = |v: f32| f16::from_f32(v).to_f32();
        let scale: Vec<f32> = (0..rows * cols / group)
            .map(|_| f16_exact((next() % 1000) as f32 / 50_000.0 + 1e-4))
            .collect();
        let offset = scale
            .iter()
            .map(|&d| {
                if symmetric {
                    -128.0 * d
                } else {
                    f16_exact(-((next() % 1000) as f32) / 4_000.0)
                }
            })
            .collect();
        let weights = Affine {
            group,
            bits: 8,
            q,
            scale,
            offset,
        };
        let x: Vec<f32> = (0..n * cols)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let w = QuantPanels::pack(rows, cols, &weights)?;
        Ok((w, QuantActs::new(&x, n, cols, group), n))
    }
}

/// The four tile instructions as Intel's SDM defines them, on memory: tests run the tile logic
/// with it on any CPU.
#[cfg(test)]
pub(super) mod emulated {
    use super::{QuantActs, QuantPanels, Sums, Tiles, ROWS, TOKENS};

    /// C, A and B as shaped by `shape`.
    #[derive(Default)]
    pub struct Emulated {
        mr: usize,
        group: usize,
    }

    impl Tiles for Emulated {
        unsafe fn shape(&mut self, mr: usize, group: usize) {
            *self = Emulated { mr, group };
        }

        unsafe fn product(
            &mut self,
            set: usize,
            a: *const i8,
            stride: usize,
            b: *const u8,
            c: &mut Sums,
        ) {
            assert!(set < 2, "two tile sets");
            // tilezero, then tdpbsud: C[m][n] += Σ_k A[m] dword k · B[k] dword n, bytewise
            // signed × unsigned; then tilestored writes the `mr` rows.
            for (m, row) in c.iter_mut().take(self.mr).enumerate() {
                for (n, sum) in row.iter_mut().enumerate() {
                    *sum = (0..self.group)
                        .map(|k| {
                            let x = *a.add(m * stride + k) as i32;
                            x * *b.add(k / 4 * 64 + 4 * n + k % 4) as i32
                        })
                        .sum();
                }
            }
        }
    }

    /// `super::kernel` on the emulated tiles, for panels of one byte per value.
    pub fn kernel(
        acts: &QuantActs,
        t0: usize,
        mr: usize,
        w: &QuantPanels,
        p: usize,
        acc: &mut [[f32; ROWS]; TOKENS],
    ) {
        assert!(!w.nibbles, "the tiles take one byte per value");
        // SAFETY: the emulation needs no hardware; `tile` reads only inside `w` and `acts`.
        unsafe { super::tile(&mut Emulated::default(), acts, t0, mr, w, p, acc) }
    }
}
