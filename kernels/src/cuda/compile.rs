//! Run-time pieces that must work before any kernel runs: finding the CUDA libraries
//! (cudarc panics on a missing one, so we look first) and compiling the `.cu` sources
//! with NVRTC to a cubin for the device's architecture, cached on disk.

use std::ffi::{CStr, CString, c_char};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::sys as nvrtc;

use super::CudaError;

/// The kernel sources, in the order they are joined (helpers first).
pub const SOURCES: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../cuda/common.cuh")),
    ("elementwise.cu", include_str!("../../cuda/elementwise.cu")),
    ("attention.cu", include_str!("../../cuda/attention.cu")),
    ("moe.cu", include_str!("../../cuda/moe.cu")),
];

/// The joined program text, with `#line` markers so NVRTC errors name the right file.
pub fn program_source() -> String {
    let mut s = String::new();
    for (name, text) in SOURCES {
        s.push_str(&format!("#line 1 \"{name}\"\n"));
        s.push_str(text);
        s.push('\n');
    }
    s
}

/// Checks that every CUDA library the backend loads can be opened, naming what is
/// missing and where to point `LD_LIBRARY_PATH` instead of letting cudarc panic.
pub fn probe_libraries(names: &[&str]) -> Result<(), CudaError> {
    let mut missing = Vec::new();
    for &name in names {
        let candidates = cudarc::get_lib_name_candidates(name);
        // SAFETY: opening a shared library runs its initialisers; these are the CUDA
        // libraries cudarc itself would open (and keep open) a moment later.
        let found = candidates
            .iter()
            .any(|c| unsafe { libloading::Library::new(c) }.is_ok());
        if !found {
            missing.push(format!("lib{name}.so"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CudaError::MissingLibraries(missing.join(", ")))
    }
}

/// Directories searched for `cuda_bf16.h`: `$HYSERVE_CUDA_INCLUDE`, then the usual
/// toolkit locations.
fn include_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("HYSERVE_CUDA_INCLUDE") {
        dirs.extend(std::env::split_paths(&d));
    }
    dirs.extend(
        ["/usr/local/cuda/include", "/usr/include"]
            .iter()
            .map(PathBuf::from),
    );
    dirs.into_iter()
        .filter(|d| d.join("cuda_bf16.h").exists())
        .collect()
}

fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both out-pointers are valid for the call.
    let r = unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) };
    check(r, "nvrtcVersion")?;
    Ok((major, minor))
}

fn check(r: nvrtc::nvrtcResult, what: &str) -> Result<(), CudaError> {
    if r == nvrtc::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Nvrtc(format!("{what} failed: {r:?}")))
    }
}

/// 64-bit FNV-1a: a stable cache key across builds and platforms.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where compiled cubins are kept: `$HYSERVE_KERNEL_CACHE`, else a folder in the
/// system's temporary directory.
fn cache_dir() -> PathBuf {
    std::env::var_os("HYSERVE_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("hyserve-kernels"))
}

/// Compiles the program for `arch` (e.g. `sm_90`), or reads it from the cache.
/// Returns the cubin and whether it came from the cache.
pub fn cubin_for(arch: &str) -> Result<(Vec<u8>, bool), CudaError> {
    let src = program_source();
    let (major, minor) = nvrtc_version()?;
    let options = compile_options(arch);
    let key = fnv1a(&[
        src.as_bytes(),
        options.join(" ").as_bytes(),
        format!("nvrtc {major}.{minor}").as_bytes(),
    ]);
    let path = cache_dir().join(format!("hyserve-{arch}-{key:016x}.cubin"));
    if let Ok(bytes) = std::fs::read(&path)
        && !bytes.is_empty()
    {
        return Ok((bytes, true));
    }
    let cubin = compile(&src, &options)?;
    // A failed cache write only costs the next start a compile.
    let _ = write_atomic(&path, &cubin);
    Ok((cubin, false))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// The NVRTC options for `arch`.
pub fn compile_options(arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    // Tuning experiments: `HYSERVE_NVRTC_DEFINES=GEMV_U=2,...` becomes -D options (part
    // of the cache key, like every option).
    if let Ok(defs) = std::env::var("HYSERVE_NVRTC_DEFINES") {
        o.extend(
            defs.split(',')
                .filter(|d| !d.is_empty())
                .map(|d| format!("-D{d}")),
        );
    }
    for d in include_dirs() {
        o.push(format!("--include-path={}", d.display()));
    }
    o
}

/// Compiles `src` with NVRTC and returns the cubin (errors carry NVRTC's log).
pub fn compile(src: &str, options: &[String]) -> Result<Vec<u8>, CudaError> {
    let c_src = CString::new(src).map_err(|_| CudaError::Nvrtc("NUL in kernel source".into()))?;
    let name = c"hyserve.cu";
    let c_opts: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()).expect("options have no NUL"))
        .collect();
    let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: `prog` is a valid out-pointer; source and name are NUL-terminated and
    // outlive the call; no headers are passed (count 0, null arrays).
    let r = unsafe {
        nvrtc::nvrtcCreateProgram(
            &mut prog,
            c_src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    check(r, "nvrtcCreateProgram")?;
    let result = compile_program(prog, &opt_ptrs);
    // SAFETY: `prog` was created above and is destroyed exactly once.
    unsafe { nvrtc::nvrtcDestroyProgram(&mut prog) };
    result
}

fn compile_program(
    prog: nvrtc::nvrtcProgram,
    opts: &[*const c_char],
) -> Result<Vec<u8>, CudaError> {
    // SAFETY: `prog` is a live program; `opts` holds `opts.len()` valid C strings.
    let r = unsafe { nvrtc::nvrtcCompileProgram(prog, opts.len() as i32, opts.as_ptr()) };
    if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        let mut size = 0usize;
        // SAFETY: valid out-pointer for the log size of a live program.
        unsafe { nvrtc::nvrtcGetProgramLogSize(prog, &mut size) };
        let mut log = vec![0 as c_char; size.max(1)];
        // SAFETY: `log` holds `size` bytes, as NVRTC asked for.
        unsafe { nvrtc::nvrtcGetProgramLog(prog, log.as_mut_ptr()) };
        // SAFETY: NVRTC writes a NUL-terminated log of `size` bytes.
        let text = unsafe { CStr::from_ptr(log.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        return Err(CudaError::Nvrtc(format!(
            "compiling kernels ({r:?}):\n{text}"
        )));
    }
    let mut size = 0usize;
    // SAFETY: valid out-pointer; the program compiled.
    let r = unsafe { nvrtc::nvrtcGetCUBINSize(prog, &mut size) };
    check(r, "nvrtcGetCUBINSize")?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds exactly the size NVRTC reported.
    let r = unsafe { nvrtc::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) };
    check(r, "nvrtcGetCUBIN")?;
    Ok(cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles the real kernel sources for Hopper with the NVRTC found at run time.
    /// CI installs NVRTC and the CUDA headers from PyPI and sets `HYSERVE_TEST_NVRTC=1`;
    /// without the variable the test says so and fails nothing it cannot check.
    #[test]
    #[cfg_attr(
        not(feature = "nvrtc-tests"),
        ignore = "needs NVRTC: run with --features nvrtc-tests (CI does)"
    )]
    fn kernels_compile_for_sm90() {
        probe_libraries(&["nvrtc"]).expect("NVRTC must be loadable for this test");
        let opts = compile_options("sm_90");
        assert!(
            opts.iter().any(|o| o.starts_with("--include-path")),
            "no include directory with cuda_bf16.h: set HYSERVE_CUDA_INCLUDE"
        );
        let cubin = compile(&program_source(), &opts).unwrap_or_else(|e| panic!("{e}"));
        // An ELF image that defines every kernel the backend loads by name.
        assert_eq!(&cubin[..4], b"\x7fELF");
        for name in super::super::KERNEL_NAMES {
            let sym = format!("\0{name}\0");
            assert!(
                cubin.windows(sym.len()).any(|w| w == sym.as_bytes()),
                "kernel `{name}` is not in the compiled image"
            );
        }
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        let a = fnv1a(&[b"ab", b"c"]);
        assert_ne!(a, fnv1a(&[b"a", b"bc"]));
        assert_ne!(a, fnv1a(&[b"ab", b"d"]));
        assert_eq!(a, fnv1a(&[b"ab", b"c"]));
    }
}
