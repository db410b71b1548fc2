//! The Kubernetes API stand-in as a process of its own, for trying things
//! by hand (the example service, `kubectl`-less checks, the real-cluster
//! test's code path): serves on a loopback port until it is stopped, and
//! writes a kubeconfig that points at it.
//!
//! ```text
//! kube-api KUBECONFIG_PATH [NAMESPACE]
//! ```

use upsilon_test_servers::kube_api::KubeApi;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: kube-api KUBECONFIG_PATH [NAMESPACE]");
        std::process::exit(2);
    };
    let namespace = args.next().unwrap_or_else(|| "default".to_owned());
    let api = KubeApi::start().await;
    api.write_kubeconfig(std::path::Path::new(&path), &namespace);
    println!("serving on {}; kubeconfig in {path}", api.url());
    let _ = tokio::signal::ctrl_c().await;
}
