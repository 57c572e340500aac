//! The control plane fixture is the real thing: objects round-trip through kube-apiserver and etcd, `kubectl`
//! talks to it, and the Node authorizer + NodeRestriction confine a node identity.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test

use anyhow::Result;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::Api;
use kube::api::PostParams;
use nodelet_integration::cluster::{Cluster, client_from};
use nodelet_integration::testbed::{Need, ready};
use serde_json::json;

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("test object matches its type")
}

/// The status code of a failed API call (0 when it did not fail with an API status).
fn api_code<T>(r: kube::Result<T>) -> u16 {
    match r {
        Err(kube::Error::Api(status)) => status.code,
        _ => 0,
    }
}

#[tokio::test]
async fn objects_round_trip_and_node_identity_is_confined() -> Result<()> {
    if !ready("objects_round_trip_and_node_identity_is_confined", &[Need::ControlPlane]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let admin = cluster.admin().await?;
    let pp = PostParams::default();

    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces.create(&pp, &from_json(json!({"metadata": {"name": "e2e"}}))).await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), "e2e");
    configmaps.create(&pp, &from_json(json!({"metadata": {"name": "cfg"}, "data": {"greeting": "hello"}}))).await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "e2e");
    let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    pods.create(&pp, &from_json(pod)).await?;

    let ns = namespaces.get("e2e").await?;
    assert_eq!(ns.status.and_then(|s| s.phase).as_deref(), Some("Active"));
    let cm = configmaps.get("cfg").await?;
    assert_eq!(cm.data.unwrap_or_default().get("greeting").map(String::as_str), Some("hello"));
    let pod = pods.get("p").await?;
    let spec = pod.spec.expect("pod has a spec");
    assert_eq!(spec.containers[0].image.as_deref(), Some("busybox"));
    // Defaulting ran in the real apiserver, and there is no node to bind to.
    assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));

    let out = cluster.kubectl().args(["get", "--raw", "/readyz"]).output()?;
    assert!(out.status.success(), "kubectl failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    // A node may renew its own Lease, but not another node's (NodeRestriction), and may not read a Secret that
    // no pod bound to it references (Node authorizer).
    let node = client_from(&cluster.node_kubeconfig("node-a")?).await?;
    let leases: Api<Lease> = Api::namespaced(node.clone(), "kube-node-lease");
    let lease = |name: &str| -> Lease {
        from_json(json!({"metadata": {"name": name}, "spec": {"holderIdentity": name, "leaseDurationSeconds": 40}}))
    };
    let created = leases.create(&pp, &lease("node-a")).await?;
    assert_eq!(created.spec.and_then(|s| s.holder_identity).as_deref(), Some("node-a"));
    assert_eq!(api_code(leases.create(&pp, &lease("node-b")).await), 403);

    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "e2e");
    secrets.create(&pp, &from_json(json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}}))).await?;
    let node_secrets: Api<Secret> = Api::namespaced(node, "e2e");
    assert_eq!(api_code(node_secrets.get("s").await), 403);
    Ok(())
}
