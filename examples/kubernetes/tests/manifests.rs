//! The example's manifests, parsed with the Kubernetes API types, checked
//! against the service: its probes' paths and port, its service account and
//! the Role that binds to it, its environment. Then the service itself, on
//! the stand-in API server with only the Role's permissions: it upgrades
//! once, and its probes answer as the manifests expect while it does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use upsilon::Outcome;
use upsilon_backends::kubernetes::k8s_openapi::api::apps::v1::Deployment;
use upsilon_backends::kubernetes::k8s_openapi::api::core::v1::{
    Container, Namespace, Service, ServiceAccount,
};
use upsilon_backends::kubernetes::k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use upsilon_backends::kubernetes::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use upsilon_backends::kubernetes::{kube, KubernetesBackend, KubernetesOptions};
use upsilon_example_kubernetes::{
    app, Settings, ENVIRONMENT, LIVENESS_PATH, METRICS_PATH, PORT, READINESS_PATH,
};
use upsilon_test_servers::kube_api::{KubeApi, TOKEN};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Every document of every `.yaml` file in the directory, as `kubectl apply
/// -f examples/kubernetes/` reads them.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let json = serde_json::to_value(v).unwrap();
            out.push((
                file.file_name().unwrap().to_string_lossy().into_owned(),
                json,
            ));
        }
    }
    out
}

/// The document as `T`; it must come back the same when written again, so
/// that a misspelt or misplaced field (which the types would drop) fails.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str, doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", doc["kind"]));
    let again = serde_json::to_value(&t).unwrap();
    assert_eq!(
        &again, doc,
        "{file}: {} has fields the API does not know",
        doc["kind"]
    );
    t
}

struct Manifests {
    namespace: Namespace,
    account: ServiceAccount,
    role: Role,
    binding: RoleBinding,
    deployment: Deployment,
    service: Service,
}

fn manifests() -> Manifests {
    let mut found: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
    for (file, doc) in documents() {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        found.entry(kind).or_default().push((file, doc));
    }
    let one = |kind: &str| -> (String, Value) {
        let docs = found.get(kind).unwrap_or_else(|| panic!("no {kind}"));
        assert_eq!(docs.len(), 1, "one {kind}");
        docs[0].clone()
    };
    let kinds: Vec<&String> = found.keys().collect();
    assert_eq!(
        kinds,
        [
            "Deployment",
            "Namespace",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ],
        "the kinds of the manifests"
    );
    let (f, d) = one("Namespace");
    let namespace = typed(&f, &d);
    let (f, d) = one("ServiceAccount");
    let account = typed(&f, &d);
    let (f, d) = one("Role");
    let role = typed(&f, &d);
    let (f, d) = one("RoleBinding");
    let binding = typed(&f, &d);
    let (f, d) = one("Deployment");
    let deployment = typed(&f, &d);
    let (f, d) = one("Service");
    let service = typed(&f, &d);
    Manifests {
        namespace,
        account,
        role,
        binding,
        deployment,
        service,
    }
}

fn container(m: &Manifests) -> Container {
    let pod = m
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    assert_eq!(pod.containers.len(), 1);
    pod.containers[0].clone()
}

fn env(c: &Container) -> BTreeMap<String, Option<String>> {
    c.env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect()
}

#[test]
fn every_object_lives_in_the_example_namespace() {
    let m = manifests();
    let ns = m.namespace.metadata.name.clone().unwrap();
    for (what, meta) in [
        ("ServiceAccount", &m.account.metadata),
        ("Role", &m.role.metadata),
        ("RoleBinding", &m.binding.metadata),
        ("Deployment", &m.deployment.metadata),
        ("Service", &m.service.metadata),
    ] {
        assert_eq!(meta.namespace.as_ref(), Some(&ns), "{what}");
    }
}

#[test]
fn the_rollout_waits_for_the_canary() {
    let m = manifests();
    let spec = m.deployment.spec.as_ref().unwrap();
    let strategy = spec.strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    assert!(
        spec.replicas.unwrap_or(1) > 1,
        "a rollout of one pod shows nothing"
    );
    // The canary is unready for as long as the upgrade takes.
    assert!(spec.progress_deadline_seconds.unwrap_or(600) >= 600);
}

#[test]
fn the_probes_ask_for_what_the_service_serves() {
    let m = manifests();
    let c = container(&m);
    let http = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"))
        .expect("a port named http");
    assert_eq!(http.container_port, i32::from(PORT));
    let port_of = |p: &IntOrString| match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            assert_eq!(name, "http", "probes name the container's port");
            http.container_port
        }
    };
    let readiness = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(readiness.path.as_deref(), Some(READINESS_PATH));
    assert_eq!(port_of(&readiness.port), i32::from(PORT));
    let liveness = c.liveness_probe.as_ref().unwrap();
    let live = liveness.http_get.as_ref().unwrap();
    assert_eq!(live.path.as_deref(), Some(LIVENESS_PATH));
    assert_eq!(port_of(&live.port), i32::from(PORT));
    assert!(
        liveness.failure_threshold.unwrap_or(3) >= 2,
        "one slow answer must not restart the pod"
    );
    let pod = m.deployment.spec.as_ref().unwrap().template.clone();
    let annotations = pod.metadata.unwrap().annotations.unwrap();
    assert_eq!(annotations["prometheus.io/path"], METRICS_PATH);
    assert_eq!(annotations["prometheus.io/port"], PORT.to_string());
    let target = m.service.spec.unwrap().ports.unwrap()[0]
        .target_port
        .clone();
    assert_eq!(target.map(|t| port_of(&t)), Some(i32::from(PORT)));
}

#[test]
fn the_environment_is_what_the_service_reads() {
    let m = manifests();
    let c = container(&m);
    let pod_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAME")
        .expect("POD_NAME");
    let field = pod_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("POD_NAME from the downward API");
    assert_eq!(field.field_path, "metadata.name");
    let known: Vec<&str> = ENVIRONMENT.iter().map(|(k, _)| *k).collect();
    let vars = env(&c);
    for name in vars.keys() {
        assert!(
            known.contains(&name.as_str()),
            "{name} is not read by the service"
        );
    }
    let settings = Settings::from(|k| match k {
        "POD_NAME" => Some("accounts-7f9c-x2b".to_owned()),
        k => vars.get(k).cloned().flatten(),
    })
    .unwrap();
    assert_eq!(settings.port, PORT);
    assert_eq!(settings.pod.as_deref(), Some("accounts-7f9c-x2b"));
    assert!(settings.url.starts_with("kubernetes://"));
    upsilon::parse_version(&settings.app_version).unwrap();
    // The image the manifests run is the one the Dockerfile says to build.
    let image = c.image.unwrap();
    let dockerfile = std::fs::read_to_string(dir().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(&format!("-t {image} ")), "{image}");
    assert!(image.ends_with(env!("CARGO_PKG_VERSION")), "{image}");
}

#[test]
fn the_service_account_has_exactly_the_role_it_needs() {
    let m = manifests();
    let pod = m.deployment.spec.unwrap().template.spec.unwrap();
    let account = m.account.metadata.name.clone().unwrap();
    assert_eq!(pod.service_account_name.as_ref(), Some(&account));
    assert_ne!(pod.automount_service_account_token, Some(false));
    let grace = pod.termination_grace_period_seconds.unwrap();
    assert!(
        grace >= 10,
        "time to cancel a task and release the lease: {grace}"
    );
    assert_eq!(m.binding.role_ref.kind, "Role");
    assert_eq!(
        Some(&m.binding.role_ref.name),
        m.role.metadata.name.as_ref()
    );
    let subjects = m.binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, account);
    assert_eq!(subjects[0].namespace, m.account.metadata.namespace);
    let verbs = ["get", "list", "watch", "create", "update"];
    let mut rules: Vec<(String, String, Vec<String>)> = m
        .role
        .rules
        .unwrap()
        .into_iter()
        .map(|r| {
            assert_eq!(r.api_groups.as_ref().map(Vec::len), Some(1));
            assert_eq!(r.resources.as_ref().map(Vec::len), Some(1));
            assert!(r.resource_names.is_none());
            (
                r.api_groups.unwrap()[0].clone(),
                r.resources.unwrap()[0].clone(),
                r.verbs,
            )
        })
        .collect();
    rules.sort();
    assert_eq!(
        rules,
        [
            (
                "".into(),
                "configmaps".into(),
                verbs.map(String::from).to_vec()
            ),
            (
                "coordination.k8s.io".into(),
                "leases".into(),
                verbs.map(String::from).to_vec()
            ),
        ]
    );
}

/// The Role's rules, as the stand-in enforces them.
fn allowed(role: &Role) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in role.rules.iter().flatten() {
        for resource in r.resources.iter().flatten() {
            for verb in &r.verbs {
                out.push((resource.clone(), verb.clone()));
            }
        }
    }
    out
}

async fn node(api: &KubeApi, namespace: &str, settings: &Settings) -> upsilon::Upsilon {
    let mut config = kube::Config::new(api.url().parse().unwrap());
    config.default_namespace = namespace.to_owned();
    config.auth_info.token = Some(TOKEN.to_owned().into());
    let backend = KubernetesBackend::connect(KubernetesOptions::new().config(config))
        .await
        .unwrap();
    settings.upsilon(Arc::new(backend)).unwrap()
}

/// The service with the manifests' environment, on the stand-in with only
/// the Role's permissions: the canary upgrades, live and not ready while
/// it does, ready after; a second pod is ready at once without work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_upgrades_with_only_the_roles_permissions() {
    let m = manifests();
    let namespace = m.namespace.metadata.name.clone().unwrap();
    let vars = env(&container(&m));
    let api = KubeApi::start().await;
    let rules = allowed(&m.role);
    let rules: Vec<(&str, &str)> = rules
        .iter()
        .map(|(r, v)| (r.as_str(), v.as_str()))
        .collect();
    api.allow(&rules);

    let settings = Settings::from(|k| match k {
        "APP_VERSION" => Some("1.1.0".to_owned()),
        "BACKFILL_SECONDS" => Some("2".to_owned()),
        "POD_NAME" => Some("accounts-canary".to_owned()),
        k => vars.get(k).cloned().flatten(),
    })
    .unwrap();
    let canary = node(&api, &namespace, &settings).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let routes = app(canary.probe(), None, &settings);
    tokio::spawn(async move { axum::serve(listener, routes).await });
    let run = tokio::spawn(async move { canary.run().await });

    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{base}{path}")).send();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status: Value = get("/upsilon/status").await.unwrap().json().await.unwrap();
        if status["phase"] == "upgrading" && status["task"] == "backfill_balances" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never upgrading: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(LIVENESS_PATH).await.unwrap().status(), 200);
    assert_eq!(get(READINESS_PATH).await.unwrap().status(), 503);
    let outcome = run.await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");
    assert_eq!(get(READINESS_PATH).await.unwrap().status(), 200);
    assert_eq!(get(LIVENESS_PATH).await.unwrap().status(), 200);

    let next = node(&api, &namespace, &settings).await;
    let outcome = next.run().await.unwrap();
    assert!(matches!(outcome, Outcome::UpToDate { .. }), "{outcome}");
}
