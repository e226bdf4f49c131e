use which::which;

fn main() {
    // Rebuild when bpf-linker changes (it is the linker for the bpfel target).
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
    // bpf-linker's default (LLVM's -bpf-expand-memcpy-in-order) turns every
    // memset and memmove, however small, into a call to a subprogram that
    // loops per byte; without it LLVM inlines them as word stores.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
