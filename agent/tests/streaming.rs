//! `kubectl exec` and `kubectl port-forward` end to end on nodelet as the only node of a real control plane: the
//! API server proxies to nodelet's kubelet API, which speaks SPDY/3.1 (the API server translates kubectl's
//! WebSocket requests to it, or passes kubectl's SPDY through with `KUBECTL_*_WEBSOCKETS=false`). Checked: stdout,
//! stderr and exit codes, stdin to EOF, a terminal (with its size), and forwarded connections to a pod's port,
//! including one to a port nothing listens on; 64 MiB both ways through exec and through a forwarded port, 20
//! connections at once; `kubectl cp` both ways; `kubectl attach` and `run -it`; `kubectl debug` (ephemeral
//! containers, with and without `--target`); 401 and 403 straight on the kubelet API.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{ChildGuard, pod, wait_pod};

const NODE_WS: &str = "nodelet-streaming-ws";
const NODE_SPDY: &str = "nodelet-streaming-spdy";

/// The large transfers' size: 64 MiB.
const BIG: usize = 64 << 20;

/// Runs kubectl with `env` set, `stdin` fed: (exit code, stdout, stderr).
fn kubectl(cluster: &Cluster, env: &[(&str, &str)], args: &[&str], stdin: &[u8]) -> Result<(i32, String, String)> {
    let (code, out, err) = kubectl_bytes(cluster, env, args, stdin)?;
    Ok((code, String::from_utf8_lossy(&out).into_owned(), err))
}

/// [`kubectl`] with stdout as bytes; stdin is written from a thread (kubectl's output is read meanwhile).
fn kubectl_bytes(
    cluster: &Cluster,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: &[u8],
) -> Result<(i32, Vec<u8>, String)> {
    let mut cmd = cluster.kubectl();
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("kubectl")?;
    let mut input = child.stdin.take().context("stdin")?;
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&data));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok((out.status.code().unwrap_or(-1), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned()))
}

fn random(len: usize) -> Result<Vec<u8>> {
    let mut data = vec![0; len];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut data)?;
    Ok(data)
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// `kubectl cp` (tar over exec) into the pod and back, byte for byte.
fn check_cp(cluster: &Cluster, pod: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (local, back) = (dir.path().join("sent.bin"), dir.path().join("back.bin"));
    let sent = random(3 << 20)?;
    std::fs::write(&local, &sent)?;
    let (local_arg, back_arg) = (local.to_string_lossy().into_owned(), back.to_string_lossy().into_owned());
    let (code, _, err) = kubectl(cluster, &[], &["cp", &local_arg, &format!("default/{pod}:/tmp/copied.bin")], b"")?;
    ensure!(code == 0, "{pod}: kubectl cp in: {code} {err:?}");
    let (code, out, err) = kubectl(cluster, &[], &["exec", pod, "--", "sha256sum", "/tmp/copied.bin"], b"")?;
    ensure!(code == 0 && out.starts_with(&sha256(&sent)), "{pod}: in the pod: {out:?} {err:?}");
    let (code, _, err) = kubectl(cluster, &[], &["cp", &format!("default/{pod}:/tmp/copied.bin"), &back_arg], b"")?;
    ensure!(code == 0, "{pod}: kubectl cp out: {code} {err:?}");
    ensure!(std::fs::read(&back)? == sent, "{pod}: kubectl cp out: the file came back different");
    Ok(())
}

/// `kubectl debug`: an ephemeral container in the running pod. With `--target` it sees the target's processes;
/// without, it has its own PID namespace but the pod's hostname (and network); it runs once, is never restarted,
/// and is reported under `ephemeralContainerStatuses`.
async fn check_debug(cluster: &Cluster, pods: &Api<Pod>, image: &str) -> Result<()> {
    let text = typed_in_terminal(
        cluster,
        &format!(
            "debug -it shell-ws --image={image} --target=main -c debugger -- sh -c 'read x; echo \"[$x]\"; ps -o comm'"
        ),
        "",
        "debugging",
    )?;
    ensure!(text.contains("[debugging]"), "kubectl debug -it: {text:?}");
    ensure!(text.contains("httpd"), "kubectl debug --target: the target's processes are not visible: {text:?}");

    let (code, _, err) = kubectl(
        cluster,
        &[],
        &["debug", "shell-ws", &format!("--image={image}"), "-c", "plain", "--", "sh", "-c", "ps -o comm; hostname"],
        b"",
    )?;
    ensure!(code == 0, "kubectl debug: {code} {err:?}");
    let ephemeral = |p: &Pod, name: &str| {
        p.status
            .as_ref()
            .and_then(|s| s.ephemeral_container_statuses.as_ref())
            .and_then(|l| l.iter().find(|c| c.name == name).cloned())
    };
    let exit = |p: &Pod, name: &str| ephemeral(p, name).and_then(|c| c.state?.terminated).map(|t| t.exit_code);
    let done = wait_pod(pods, "shell-ws", "both ephemeral containers ended", Duration::from_secs(60), |p| {
        exit(p, "debugger").is_some() && exit(p, "plain").is_some()
    })
    .await?;
    ensure!(exit(&done, "debugger") == Some(0) && exit(&done, "plain") == Some(0), "{:?}", done.status);
    for name in ["debugger", "plain"] {
        let status = ephemeral(&done, name).context("status")?;
        ensure!(status.restart_count == 0 && !status.ready, "{name}: {status:?}");
        ensure!(status.container_id.as_deref().is_some_and(|id| id.starts_with("nodelet://")), "{status:?}");
    }
    let main = done.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|l| l.first().cloned());
    ensure!(main.is_some_and(|m| m.restart_count == 0 && m.ready), "the debugged container was disturbed");
    let (code, log, err) = kubectl(cluster, &[], &["logs", "shell-ws", "-c", "plain"], b"")?;
    ensure!(code == 0, "kubectl logs -c plain: {err:?}");
    ensure!(!log.contains("httpd"), "without --target the debug container has its own PID namespace: {log:?}");
    ensure!(log.trim_end().ends_with("shell-ws"), "the pod's hostname: {log:?}");
    Ok(())
}

/// The two ways a request reaches nodelet: WebSocket to the API server (translated to SPDY), or SPDY throughout.
const TRANSPORTS: [(&str, &[(&str, &str)]); 2] = [
    ("websocket->spdy", &[]),
    ("spdy", &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false"), ("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")]),
];

#[tokio::test]
async fn exec_and_port_forward_through_the_api_server() -> Result<()> {
    if !ready("exec_and_port_forward_through_the_api_server", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    // Two nodes: one declares ExtendWebSocketsToKubelet (the API server passes WebSocket requests through), one
    // does not (the API server translates them to SPDY).
    let (ws_node, _ws_net) = support::start_cluster_node(&cluster, &registry, NODE_WS, "address: 127.0.0.1\n", &[])?;
    let (spdy_node, _spdy_net) = support::start_cluster_node(
        &cluster,
        &registry,
        NODE_SPDY,
        "address: 127.0.0.1\nfeatureGates: {ExtendWebSocketsToKubelet: false}\n",
        &[],
    )?;
    let client = cluster.admin().await?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let declared = |n: &k8s_openapi::api::core::v1::Node| {
        n.status.as_ref().and_then(|s| s.declared_features.clone()).unwrap_or_default()
    };
    support::wait_for("declared features", Duration::from_secs(30), || async {
        let (ws, spdy) = (nodes.get(NODE_WS).await?, nodes.get(NODE_SPDY).await?);
        let restart_all = "RestartAllContainersOnContainerExits";
        Ok((declared(&ws) == ["ExtendWebSocketsToKubelet", restart_all] && declared(&spdy) == [restart_all])
            .then_some(()))
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (pod_name, node_name) in [("shell-ws", NODE_WS), ("shell-spdy", NODE_SPDY)] {
        pods.create(&PostParams::default(), &pod(&format!(
            "metadata: {{name: {pod_name}}}\nspec:\n  nodeName: {node_name}\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'mkdir -p /www && echo served-by-httpd > /www/index.html && head -c {BIG} /dev/urandom > /www/big && exec httpd -f -p 8080 -h /www']\n"
        ))).await?;
    }
    for (pod_name, node) in [("shell-ws", &ws_node), ("shell-spdy", &spdy_node)] {
        wait_pod(&pods, pod_name, "Running", Duration::from_secs(60), |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .await
        .with_context(|| node.log())?;
        check_exec(&cluster, pod_name).with_context(|| node.log())?;
        check_port_forward(&cluster, pod_name).await.with_context(|| node.log())?;
        check_cp(&cluster, pod_name).with_context(|| node.log())?;
    }
    check_attach(&cluster, &pods, &image).await.with_context(|| ws_node.log())?;
    check_debug(&cluster, &pods, &image).await.with_context(|| ws_node.log())?;

    // Upstream's conformance test "Pods should support remote command execution over websockets": a pod with the
    // restricted security profile mixed in, exec'd into over WebSocket with an older channel protocol (which the
    // API server passes through to any node).
    for (pod_name, node_name, node) in
        [("conformance-ws", NODE_WS, &ws_node), ("conformance-spdy", NODE_SPDY, &spdy_node)]
    {
        pods.create(&PostParams::default(), &pod(&format!(
            "metadata: {{name: {pod_name}}}\nspec:\n  nodeName: {node_name}\n  terminationGracePeriodSeconds: 0\n  securityContext: {{runAsNonRoot: true, runAsUser: 1000, seccompProfile: {{type: RuntimeDefault}}}}\n  containers:\n  - name: main\n    image: {image}\n    command: [/bin/sh, -c, 'echo container is alive; sleep 600']\n    securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}\n"
        ))).await?;
        wait_pod(&pods, pod_name, "Running", Duration::from_secs(60), |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .await
        .with_context(|| node.log())?;
        for protocol in ["channel.k8s.io", "base64.channel.k8s.io", "v4.channel.k8s.io"] {
            let out = raw_websocket_exec(&client, pod_name, protocol).await.with_context(|| node.log())?;
            ensure!(out == "remote execution test\n", "{pod_name} {protocol}: {out:?}");
        }
    }

    // /run straight on the kubelet API (as the API server's identity): the command's output, or a 500.
    let node = nodes.get(NODE_WS).await?;
    let port = node.status.and_then(|s| s.daemon_endpoints?.kubelet_endpoint).map(|e| e.port).context("port")?;
    let master = cluster.pki().client("kubelet-test-master", "tester", &["system:masters"])?;
    let run = |cmd: &str| -> Result<String> {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "10", "-X", "POST", "-w", "\n%{http_code}", "--cert"])
            .arg(&master.cert)
            .arg("--key")
            .arg(&master.key)
            .arg(format!("https://127.0.0.1:{port}/run/default/shell-ws/main?cmd={cmd}"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let ok = run("echo+run+works")?;
    ensure!(ok == "run works\n\n200", "/run: {ok:?}");
    let failed = run("false")?;
    ensure!(failed.starts_with("command 'false' exited with 1") && failed.ends_with("500"), "/run: {failed:?}");

    // Straight on the kubelet API: anonymous is 401; a user who may read logs (get nodes/proxy) but not create
    // nodes/proxy may not exec.
    let reader_role: k8s_openapi::api::rbac::v1::ClusterRole = serde_yaml::from_str(
        "metadata: {name: streaming-log-reader}\nrules: [{apiGroups: [''], resources: [nodes/proxy], verbs: [get]}]",
    )?;
    let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_yaml::from_str(
        "metadata: {name: streaming-log-reader}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: streaming-log-reader}\nsubjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: log-reader}]",
    )?;
    Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &reader_role)
        .await?;
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let reader = cluster.pki().client("kubelet-test-log-reader", "log-reader", &[])?;
    let call = |method: &str, path: &str, cert: Option<&nodelet_integration::certs::CertFiles>| -> Result<String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sk", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-X", method]);
        if let Some(cert) = cert {
            cmd.arg("--cert").arg(&cert.cert).arg("--key").arg(&cert.key);
        }
        let out = cmd.arg(format!("https://127.0.0.1:{port}{path}")).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let exec = "/exec/default/shell-ws/main?command=true&output=1";
    ensure!(call("POST", exec, None)? == "401", "anonymous exec");
    // The authorizer's cache may not have seen the new binding yet: wait for the logs to be readable.
    support::wait_for("the log reader's binding", Duration::from_secs(30), || async {
        Ok((call("GET", "/containerLogs/default/shell-ws/main", Some(&reader))? == "200").then_some(()))
    })
    .await?;
    ensure!(call("POST", exec, Some(&reader))? == "403", "exec by a user who may only read");
    ensure!(call("POST", "/portForward/default/shell-ws", Some(&reader))? == "403", "port-forward by a reader");
    Ok(())
}

/// `kubectl attach` to a container that keeps its stdin (stdinOnce: it reads EOF when the client detaches), and
/// `kubectl run -it` (a terminal, stdin, and the pod's output through attach).
async fn check_attach(cluster: &Cluster, pods: &Api<Pod>, image: &str) -> Result<()> {
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: reader}}\nspec:\n  nodeName: {NODE_WS}\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {image}\n    stdin: true\n    stdinOnce: true\n    command: [sh, -c, 'while read l; do echo got:$l; done; echo stdin-closed']\n"
    ))).await?;
    wait_pod(pods, "reader", "Running", Duration::from_secs(60), |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await?;
    let (code, out, err) = kubectl(cluster, &[], &["attach", "-i", "reader"], b"one\ntwo\n")?;
    ensure!(code == 0, "attach: {code} {out:?} {err:?}");
    ensure!(out.contains("got:one\ngot:two\n"), "attach: {out:?} {err:?}");
    wait_pod(pods, "reader", "Succeeded (stdin closed after the first attach)", Duration::from_secs(30), |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
    })
    .await?;
    let (_, log, _) = kubectl(cluster, &[], &["logs", "reader"], b"")?;
    ensure!(log == "got:one\ngot:two\nstdin-closed\n", "log: {log:?}");

    // kubectl run -it --rm: a TTY container, attached at once; what is typed reaches it and its output comes back.
    let text = typed_in_terminal(
        cluster,
        &format!(
            "run tty-pod -it --rm --restart=Never --image={image} --overrides='{{\"spec\":{{\"nodeName\":\"{NODE_WS}\"}}}}' -- sh -c 'read x; echo \"[$x]\"; stty size'"
        ),
        "stty cols 77 rows 22; ",
        "typed-line",
    )?;
    ensure!(text.contains("[typed-line]"), "kubectl run -it: {text:?}");
    ensure!(text.contains("22 77"), "kubectl run -it: terminal size {text:?}");
    // --rm: kubectl deletes the pod once the session ended, and the node lets it go.
    support::wait_for("tty-pod deleted (--rm)", Duration::from_secs(30), || async {
        Ok(pods.get_opt("tty-pod").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

/// Runs `kubectl <args>` (shell words) in a terminal after `setup` (shell), types `line` into it 6 s later (once
/// kubectl is attached); what the terminal showed. script(1) gives kubectl a terminal and passes what it reads on
/// its stdin into it.
fn typed_in_terminal(cluster: &Cluster, args: &str, setup: &str, line: &str) -> Result<String> {
    let kc = cluster.kubectl();
    let kubectl: Vec<String> =
        std::iter::once(kc.get_program()).chain(kc.get_args()).map(|a| a.to_string_lossy().into_owned()).collect();
    let inner = format!("{setup}{} {args}", kubectl.join(" "));
    let mut script = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut typing = script.stdin.take().context("stdin")?;
    let typed = format!("{line}\r");
    let typist = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(6));
        let _ = typing.write_all(typed.as_bytes());
        std::thread::sleep(Duration::from_secs(10));
    });
    let out = script.wait_with_output()?;
    let _ = typist.join();
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An exec over a WebSocket with an older channel protocol, as upstream's conformance test does it (the API
/// server passes these through to the node whatever it declares): stdout as it arrived on channel 1.
async fn raw_websocket_exec(client: &kube::Client, pod: &str, protocol: &str) -> Result<String> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::{Message, protocol::Role};
    let uri = format!(
        "/api/v1/namespaces/default/pods/{pod}/exec?stdout=1&stderr=1&container=main&command=echo&command=remote+execution+test"
    );
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let request = hyper::Request::get(uri)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", key)
        .header("Sec-WebSocket-Protocol", protocol)
        .body(kube::client::Body::from(Vec::new()))?;
    let response = client.send(request).await?;
    ensure!(response.status() == 101, "{protocol}: {}", response.status());
    let upgraded = hyper::upgrade::on(response).await?;
    let mut ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(hyper_util::rt::TokioIo::new(upgraded), Role::Client, None)
            .await;
    let base64 = protocol.starts_with("base64.");
    let mut stdout = Vec::new();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(20), ws.next()).await? {
        let (channel, data) = match message? {
            Message::Binary(b) if !base64 && !b.is_empty() => (b[0], b[1..].to_vec()),
            Message::Text(t) if base64 && !t.is_empty() => {
                use base64::Engine;
                let s = t.as_str();
                (s.as_bytes()[0] - b'0', base64::engine::general_purpose::STANDARD.decode(&s[1..])?)
            }
            Message::Close(_) => break,
            _ => continue,
        };
        if channel == 1 {
            stdout.extend_from_slice(&data);
        }
    }
    Ok(String::from_utf8(stdout)?)
}

/// Output, exit codes, stdin and a terminal, through both of kubectl's transports.
fn check_exec(cluster: &Cluster, pod: &str) -> Result<()> {
    for (name, env) in TRANSPORTS {
        // Output on both streams and the exit code.
        let (code, out, err) =
            kubectl(cluster, env, &["exec", pod, "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3"], b"")?;
        ensure!(code == 3, "{pod} {name}: exit code {code}; {out:?} {err:?}");
        ensure!(out == "to-out\n", "{pod} {name}: stdout {out:?}");
        ensure!(
            err.starts_with("to-err\n") && err.contains("command terminated with exit code 3"),
            "{pod} {name}: {err:?}"
        );
        // Stdin to EOF.
        let (code, out, err) =
            kubectl(cluster, env, &["exec", "-i", pod, "--", "sh", "-c", "cat; echo eof"], b"typed\n")?;
        ensure!(code == 0 && out == "typed\neof\n", "{pod} {name}: {code} {out:?} {err:?}");
        // 64 MiB through `cat`, both ways at once, arrives whole.
        let sent = random(BIG)?;
        let (code, out, err) = kubectl_bytes(cluster, env, &["exec", "-i", pod, "--", "cat"], &sent)?;
        ensure!(code == 0 && out.len() == BIG, "{pod} {name}: {code}, {} bytes back; {err:?}", out.len());
        ensure!(sha256(&out) == sha256(&sent), "{pod} {name}: 64 MiB through cat came back different");
        // A command that does not exist.
        let (code, _, err) = kubectl(cluster, env, &["exec", pod, "--", "/no/such/binary"], b"")?;
        ensure!(code != 0 && !err.is_empty(), "{pod} {name}: {code} {err:?}");
        // A terminal, through script(1) so that kubectl has one: its size reaches the process (set right after
        // the process started, as upstream's runtimes do: the command reads it a moment later).
        let kc = cluster.kubectl();
        let line: Vec<String> =
            std::iter::once(kc.get_program()).chain(kc.get_args()).map(|a| a.to_string_lossy().into_owned()).collect();
        let vars: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        let inner = format!(
            "stty cols 91 rows 37; {vars}{} exec -it {pod} -- sh -c 'tty; sleep 0.5; stty size'",
            line.join(" ")
        );
        let out = Command::new("script").args(["-qec", &inner, "/dev/null"]).stdin(Stdio::null()).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(text.contains("/dev/pts/"), "{pod} {name}: no terminal in the container: {text:?}");
        ensure!(text.contains("37 91"), "{pod} {name}: the terminal size did not arrive: {text:?}");
    }
    Ok(())
}

/// HTTP through a forwarded port (two connections on one session), and a port nothing listens on.
async fn check_port_forward(cluster: &Cluster, pod: &str) -> Result<()> {
    for (name, env) in TRANSPORTS {
        let mut cmd = cluster.kubectl();
        cmd.args(["port-forward", &format!("pod/{pod}"), ":8080", ":9"]).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = ChildGuard(cmd.spawn()?);
        let mut lines = BufReader::new(child.0.stdout.take().context("stdout")?).lines();
        let mut ports = Vec::new();
        while ports.len() < 2 {
            let line = lines.next().context("kubectl port-forward ended")??;
            // "Forwarding from 127.0.0.1:PORT -> 8080"
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                ports.push(rest.split_whitespace().next().unwrap_or_default().parse::<u16>()?);
            }
        }
        // 20 connections at once on one session.
        let port = ports[0];
        let get = move |path: &'static str| -> Result<Vec<u8>> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
            let mut response = Vec::new();
            s.read_to_end(&mut response)?;
            Ok(response)
        };
        let together: Vec<_> = (0..20).map(|_| std::thread::spawn(move || get("/"))).collect();
        for t in together {
            let response = t.join().map_err(|_| anyhow::anyhow!("a connection thread panicked"))??;
            let text = String::from_utf8_lossy(&response);
            ensure!(text.contains("served-by-httpd"), "{pod} {name}: {text:?}");
        }
        // 64 MiB through the forwarded port, checked against the file's checksum in the pod.
        let response = get("/big")?;
        let at = response.windows(4).position(|w| w == b"\r\n\r\n").context("no HTTP header end")? + 4;
        let body = &response[at..];
        let (_, out, _) = kubectl(cluster, &[], &["exec", pod, "--", "sha256sum", "/www/big"], b"")?;
        ensure!(body.len() == BIG && out.starts_with(&sha256(body)), "{pod} {name}: {} bytes; {out:?}", body.len());
        // Nothing listens on port 9 in the pod: the connection ends and kubectl reports nodelet's error.
        let mut s = std::net::TcpStream::connect(("127.0.0.1", ports[1]))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        ensure!(buf.is_empty(), "{pod} {name}: {buf:?}");
        // kubectl prints the error stream's message when it reads it: wait for the line (not a fixed sleep).
        let wanted = format!("error forwarding port 9 to pod {pod}");
        let stderr = child.0.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut said: Vec<String> = Vec::new();
        while !said.iter().any(|l| l.contains(&wanted)) {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => said.push(line),
                Err(_) => break,
            }
        }
        let _ = child.0.kill();
        ensure!(said.iter().any(|l| l.contains(&wanted)), "{pod} {name}: kubectl said {said:?}");
    }
    Ok(())
}
