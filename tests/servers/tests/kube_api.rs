//! The Kubernetes stand-in answers as the API server does, over plain HTTP:
//! the status codes, `Status` bodies, `resourceVersion`s and watch events a
//! client sees.

use serde_json::{json, Value};
use upsilon_test_servers::kube_api::{KubeApi, TOKEN};

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(api: &KubeApi) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: api.url(),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let code = resp.status().as_u16();
        (code, resp.json().await.unwrap())
    }
}

const CM: &str = "/api/v1/namespaces/ns/configmaps";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases";

fn cm(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "labels": {"app": "x"}}, "data": data})
}

#[tokio::test]
async fn writes_are_conditional_and_failures_carry_the_apis_status() {
    let api = KubeApi::start().await;
    let c = Client::new(&api);
    let anonymous = reqwest::get(format!("{}{CM}/a", api.url())).await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);

    let (code, created) = c
        .send(reqwest::Method::POST, CM, Some(cm("a", json!({"k": "1"}))))
        .await;
    assert_eq!(code, 201);
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(created["metadata"]["uid"].is_string());
    assert_eq!(created["metadata"]["namespace"], "ns");

    let (code, again) = c
        .send(reqwest::Method::POST, CM, Some(cm("a", json!({}))))
        .await;
    assert_eq!(code, 409);
    assert_eq!(again["reason"], "AlreadyExists");
    assert_eq!(again["kind"], "Status");
    assert_eq!(again["details"]["name"], "a");

    let mut update = created.clone();
    update["data"]["k"] = json!("2");
    let (code, updated) = c
        .send(
            reqwest::Method::PUT,
            &format!("{CM}/a"),
            Some(update.clone()),
        )
        .await;
    assert_eq!(code, 200);
    let rv2 = updated["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(rv2.parse::<u64>().unwrap() > rv.parse::<u64>().unwrap());
    // The same update again carries the old resourceVersion: refused.
    let (code, stale) = c
        .send(reqwest::Method::PUT, &format!("{CM}/a"), Some(update))
        .await;
    assert_eq!(code, 409);
    assert_eq!(stale["reason"], "Conflict");
    assert!(
        stale["message"]
            .as_str()
            .unwrap()
            .contains("the object has been modified; please apply your changes to the latest version and try again"),
        "{stale}"
    );
    // An update that changes nothing keeps the resourceVersion.
    let (code, same) = c
        .send(
            reqwest::Method::PUT,
            &format!("{CM}/a"),
            Some(updated.clone()),
        )
        .await;
    assert_eq!(
        (code, same["metadata"]["resourceVersion"].as_str()),
        (200, Some(rv2.as_str()))
    );

    let (code, missing) = c
        .send(reqwest::Method::GET, &format!("{CM}/nope"), None)
        .await;
    assert_eq!(code, 404);
    assert_eq!(missing["reason"], "NotFound");
    assert_eq!(missing["message"], "configmaps \"nope\" not found");
    let (code, _) = c
        .send(
            reqwest::Method::PUT,
            &format!("{CM}/nope"),
            Some(cm("nope", json!({}))),
        )
        .await;
    assert_eq!(code, 404, "an update does not create");

    for bad in [
        cm("a_b", json!({})),
        cm("b", json!({"bad key": "x"})),
        cm("c", json!({"big": "x".repeat(1 << 20)})),
    ] {
        let (code, invalid) = c.send(reqwest::Method::POST, CM, Some(bad)).await;
        assert_eq!(code, 422, "{invalid}");
        assert_eq!(invalid["reason"], "Invalid");
        assert!(invalid["details"]["causes"].is_array());
    }
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": "l"}, "spec": {"leaseDurationSeconds": 0}});
    let (code, _) = c.send(reqwest::Method::POST, LEASES, Some(lease)).await;
    assert_eq!(code, 422);

    let (code, list) = c
        .send(
            reqwest::Method::GET,
            &format!("{CM}?labelSelector=app%3Dx"),
            None,
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "ConfigMapList");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(
        list["items"][0].get("kind").is_none(),
        "list items carry no kind"
    );
    let (_, none) = c
        .send(
            reqwest::Method::GET,
            &format!("{CM}?labelSelector=app%3Dy"),
            None,
        )
        .await;
    assert!(none["items"].as_array().unwrap().is_empty());
}

/// Reads watch events until `n` have arrived.
async fn events(resp: &mut reqwest::Response, n: usize) -> Vec<Value> {
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), resp.chunk())
            .await
            .expect("a watch event")
            .unwrap()
            .expect("the watch is still open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(i) = buf.find('\n') {
            out.push(serde_json::from_str(&buf[..i]).unwrap());
            buf.drain(..=i);
        }
    }
    out
}

#[tokio::test]
async fn watches_resume_from_a_resource_version_with_bookmarks_and_expire_when_compacted() {
    let api = KubeApi::start().await;
    let c = Client::new(&api);
    let (_, a) = c
        .send(reqwest::Method::POST, CM, Some(cm("a", json!({"k": "1"}))))
        .await;
    let from = a["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut b = a.clone();
    b["data"]["k"] = json!("2");
    c.send(reqwest::Method::PUT, &format!("{CM}/a"), Some(b))
        .await;

    let mut watch = c
        .http
        .get(format!(
            "{}{CM}?watch=true&resourceVersion={from}&allowWatchBookmarks=true&labelSelector=app%3Dx",
            api.url()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status().as_u16(), 200);
    let got = events(&mut watch, 2).await;
    assert_eq!(got[0]["type"], "MODIFIED");
    assert_eq!(got[0]["object"]["data"]["k"], "2");
    assert_eq!(got[1]["type"], "BOOKMARK");
    assert_eq!(
        got[1]["object"]["metadata"]["resourceVersion"],
        got[0]["object"]["metadata"]["resourceVersion"]
    );
    c.send(reqwest::Method::DELETE, &format!("{CM}/a"), None)
        .await;
    let got = events(&mut watch, 1).await;
    assert_eq!(got[0]["type"], "DELETED");

    api.compact();
    let mut old = c
        .http
        .get(format!(
            "{}{CM}?watch=true&resourceVersion={from}",
            api.url()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let got = events(&mut old, 1).await;
    assert_eq!(got[0]["type"], "ERROR");
    assert_eq!(got[0]["object"]["code"], 410);
    assert_eq!(got[0]["object"]["reason"], "Expired");
}
