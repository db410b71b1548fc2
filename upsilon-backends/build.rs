//! `cfg(upsilon_real_cluster)` when `KUBECONFIG` is set at build time: the
//! Kubernetes tests then run the conformance suite against that cluster
//! instead of ignoring that test.

fn main() {
    println!("cargo:rustc-check-cfg=cfg(upsilon_real_cluster)");
    println!("cargo:rerun-if-env-changed=KUBECONFIG");
    if std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        println!("cargo:rustc-cfg=upsilon_real_cluster");
    }
}
