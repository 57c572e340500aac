//! `kubectl exec` and `kubectl port-forward` end to end on nodelet as the only node of a real control plane: the
//! API server proxies to nodelet's kubelet API, which speaks SPDY/3.1 (the API server translates kubectl's
//! WebSocket requests to it, or passes kubectl's SPDY through with `KUBECTL_*_WEBSOCKETS=false`). Checked: stdout,
//! stderr and exit codes, stdin to EOF, a terminal (with its size), and forwarded connections to a pod's port,
//! including one to a port nothing listens on.
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

/// Runs kubectl with `env` set, `stdin` fed: (exit code, stdout, stderr).
fn kubectl(cluster: &Cluster, env: &[(&str, &str)], args: &[&str], stdin: &[u8]) -> Result<(i32, String, String)> {
    let mut cmd = cluster.kubectl();
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("kubectl")?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
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
        Ok((declared(&ws) == ["ExtendWebSocketsToKubelet"] && declared(&spdy).is_empty()).then_some(()))
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (pod_name, node_name) in [("shell-ws", NODE_WS), ("shell-spdy", NODE_SPDY)] {
        pods.create(&PostParams::default(), &pod(&format!(
            "metadata: {{name: {pod_name}}}\nspec:\n  nodeName: {node_name}\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'mkdir -p /www && echo served-by-httpd > /www/index.html && exec httpd -f -p 8080 -h /www']\n"
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
    }
    check_attach(&cluster, &pods, &image).await.with_context(|| ws_node.log())?;

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

    // kubectl run -it: a TTY container, attached at once; what is typed reaches it and its output comes back.
    let kc = cluster.kubectl();
    let line: Vec<String> =
        std::iter::once(kc.get_program()).chain(kc.get_args()).map(|a| a.to_string_lossy().into_owned()).collect();
    let inner = format!(
        "stty cols 77 rows 22; {} run tty-pod -it --restart=Never --image={image} \
         --overrides='{{\"spec\":{{\"nodeName\":\"{NODE_WS}\"}}}}' -- sh -c 'read x; echo \"[$x]\"; stty size'",
        line.join(" ")
    );
    // script(1) gives kubectl a terminal and passes what it reads on its stdin into it: the line is typed once
    // kubectl is attached.
    let mut script = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut typing = script.stdin.take().context("stdin")?;
    let typist = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(6));
        let _ = typing.write_all(b"typed-line\r");
        std::thread::sleep(Duration::from_secs(10));
    });
    let out = script.wait_with_output()?;
    let _ = typist.join();
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("[typed-line]"), "kubectl run -it: {text:?}");
    ensure!(text.contains("22 77"), "kubectl run -it: terminal size {text:?}");
    Ok(())
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
        // A large output arrives whole.
        let big = ["exec", pod, "--", "sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"];
        let (code, out, _) = kubectl(cluster, env, &big, b"")?;
        ensure!(code == 0 && out.len() == 3_000_000, "{pod} {name}: {} bytes", out.len());
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
        for _ in 0..2 {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", ports[0]))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            s.read_to_string(&mut response)?;
            ensure!(response.contains("served-by-httpd"), "{pod} {name}: {response:?}");
        }
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
