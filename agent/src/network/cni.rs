//! CNI (spec 1.0/1.1), called by nodelet itself: network configuration lists from the conf dir (the first file by
//! name, like upstream), plugins executed with the `CNI_*` environment and their configuration on stdin, results
//! parsed, and each attachment cached so that DEL gets the configuration and result of its ADD, also after an
//! agent restart or a configuration change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// How long one plugin call may take.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("failed to find plugin {plugin:?} in path {dirs:?}")]
    NotFound { plugin: String, dirs: Vec<PathBuf> },
    #[error("plugin type={plugin:?} failed ({command}): {message}")]
    Plugin { plugin: String, command: &'static str, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A network configuration list (`.conflist`; a single-plugin `.conf` is turned into one).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
    /// The whole list as loaded, kept in the cache for DEL.
    pub raw: Value,
}

impl NetworkList {
    pub fn parse(text: &str, path: &Path) -> Result<NetworkList, CniError> {
        let bad = |message: String| CniError::Config { path: path.to_path_buf(), message };
        let mut raw: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if raw.get("plugins").is_none() {
            // A single plugin configuration (`.conf`): its own list.
            let name = raw.get("name").cloned().unwrap_or(Value::Null);
            let version = raw.get("cniVersion").cloned().unwrap_or(Value::Null);
            raw = json!({"name": name, "cniVersion": version, "plugins": [raw]});
        }
        let name = raw["name"].as_str().filter(|n| !n.is_empty()).ok_or_else(|| bad("no network name".into()))?;
        let cni_version = raw["cniVersion"].as_str().ok_or_else(|| bad("no cniVersion".into()))?;
        let plugins = raw["plugins"].as_array().cloned().unwrap_or_default();
        if plugins.is_empty() {
            return Err(bad("no plugins".into()));
        }
        if let Some(i) = plugins.iter().position(|p| p["type"].as_str().is_none_or(str::is_empty)) {
            return Err(bad(format!("plugin {i} has no type")));
        }
        Ok(NetworkList { name: name.into(), cni_version: cni_version.into(), plugins, raw: raw.clone() })
    }

    /// The first `.conf`, `.conflist` or `.json` file in `dir` by name, like upstream; `None` if there is none.
    pub fn load_dir(dir: &Path) -> Result<Option<NetworkList>, CniError> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        files.retain(|p| p.extension().is_some_and(|e| e == "conf" || e == "conflist" || e == "json"));
        files.sort();
        let Some(first) = files.first() else { return Ok(None) };
        let text = std::fs::read_to_string(first)?;
        NetworkList::parse(&text, first).map(Some)
    }
}

/// A sandbox's network attachment: what ADD is given and what DEL needs again.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub if_name: String,
    /// `K8S_POD_*` arguments.
    pub args: Vec<(String, String)>,
    /// `runtimeConfig.portMappings` for plugins with that capability.
    pub port_mappings: Vec<Value>,
}

/// The result of a successful ADD.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cached {
    pub attachment: Attachment,
    pub config: Value,
    pub result: Value,
}

impl Cached {
    /// The IP addresses the result assigns, without prefix lengths (loopback ones, which the loopback plugin
    /// reports, are not the pod's IPs).
    pub fn ips(&self) -> Vec<String> {
        self.result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse::<std::net::IpAddr>().ok())
            .filter(|ip| !ip.is_loopback())
            .map(|ip| ip.to_string())
            .collect()
    }
}

/// Executes plugins.
#[derive(Debug, Clone)]
pub struct Cni {
    pub bin_dirs: Vec<PathBuf>,
}

impl Cni {
    pub fn find(&self, plugin: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::NotFound { plugin: plugin.into(), dirs: self.bin_dirs.clone() })
    }

    /// ADD through every plugin of the list in order, each given the previous result.
    pub async fn add(&self, list: &NetworkList, attachment: &Attachment) -> Result<Cached, CniError> {
        let mut previous: Option<Value> = None;
        for plugin in &list.plugins {
            let result = self.call("ADD", list, plugin, attachment, previous.as_ref()).await?;
            previous = Some(result);
        }
        Ok(Cached { attachment: attachment.clone(), config: list.raw.clone(), result: previous.unwrap_or_default() })
    }

    /// CHECK (CNI ≥ 0.4.0): whether the attachment is still as ADD left it.
    pub async fn check(&self, cached: &Cached) -> Result<(), CniError> {
        let list = NetworkList::parse(&cached.config.to_string(), Path::new("(cache)"))?;
        for plugin in &list.plugins {
            self.call("CHECK", &list, plugin, &cached.attachment, Some(&cached.result)).await?;
        }
        Ok(())
    }

    /// DEL through the plugins in reverse order with the cached configuration and result; every plugin is called
    /// even after a failure (so as much as possible is released), and the first error is returned.
    pub async fn del(&self, cached: &Cached) -> Result<(), CniError> {
        let list = NetworkList::parse(&cached.config.to_string(), Path::new("(cache)"))?;
        let mut first_error = None;
        for plugin in list.plugins.iter().rev() {
            if let Err(e) = self.call("DEL", &list, plugin, &cached.attachment, Some(&cached.result)).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn call(
        &self,
        command: &'static str,
        list: &NetworkList,
        plugin: &Value,
        attachment: &Attachment,
        previous: Option<&Value>,
    ) -> Result<Value, CniError> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let mut config = plugin.clone();
        config["name"] = json!(list.name);
        config["cniVersion"] = json!(list.cni_version);
        if let Some(previous) = previous {
            config["prevResult"] = previous.clone();
        }
        if plugin["capabilities"]["portMappings"].as_bool() == Some(true) && !attachment.port_mappings.is_empty() {
            config["runtimeConfig"]["portMappings"] = json!(attachment.port_mappings);
        }
        let binary = self.find(&kind)?;
        let args: Vec<String> = std::iter::once("IgnoreUnknown=1".to_string())
            .chain(attachment.args.iter().map(|(k, v)| format!("{k}={v}")))
            .collect();
        let path = std::env::join_paths(&self.bin_dirs).map_err(std::io::Error::other)?;
        let mut child = tokio::process::Command::new(&binary)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &attachment.container_id)
            .env("CNI_NETNS", &attachment.netns)
            .env("CNI_IFNAME", &attachment.if_name)
            .env("CNI_ARGS", args.join(";"))
            .env("CNI_PATH", path)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let input = serde_json::to_vec(&config).map_err(std::io::Error::other)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin may exit without reading its input (e.g. on an error of its own): its exit and output say
            // what went wrong, not our broken pipe.
            match stdin.write_all(&input).await {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
        }
        let failed = |message: String| CniError::Plugin { plugin: kind.clone(), command, message };
        let output = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| failed(format!("no answer within {} s", PLUGIN_TIMEOUT.as_secs())))??;
        let stdout: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        if !output.status.success() {
            let message = match (stdout["msg"].as_str(), stdout["details"].as_str()) {
                (Some(msg), Some(details)) if !details.is_empty() => format!("{msg}: {details}"),
                (Some(msg), _) => msg.to_string(),
                _ => String::from_utf8_lossy(&output.stderr).trim().to_string(),
            };
            return Err(failed(message));
        }
        Ok(stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_single_configs_load_first_file_by_name() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NetworkList::load_dir(dir.path()).unwrap(), None);
        assert_eq!(NetworkList::load_dir(&dir.path().join("missing")).unwrap(), None);
        std::fs::write(
            dir.path().join("20-b.conflist"),
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("10-a.conf"), r#"{"cniVersion":"1.0.0","name":"a","type":"bridge"}"#).unwrap();
        std::fs::write(dir.path().join("05-ignored.txt"), "not a config").unwrap();
        let list = NetworkList::load_dir(dir.path()).unwrap().unwrap();
        assert_eq!((list.name.as_str(), list.plugins.len()), ("a", 1));
        assert_eq!(list.plugins[0]["type"], "bridge");
        let bad = |text: &str| NetworkList::parse(text, Path::new("x.conflist")).unwrap_err().to_string();
        assert!(bad("{").starts_with("x.conflist: invalid JSON"));
        assert_eq!(bad(r#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#), "x.conflist: no network name");
        assert_eq!(bad(r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#), "x.conflist: no plugins");
        assert_eq!(
            bad(r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"mtu":1}]}"#),
            "x.conflist: plugin 0 has no type"
        );
    }

    #[test]
    fn result_ips_drop_the_prefix() {
        let cached = Cached {
            attachment: Attachment {
                container_id: "c".into(),
                netns: "/n".into(),
                if_name: "eth0".into(),
                args: Vec::new(),
                port_mappings: Vec::new(),
            },
            config: Value::Null,
            result: json!({"ips": [{"address": "127.0.0.1/8"}, {"address": "10.88.0.5/16"}, {"address": "fd00::5/64"}]}),
        };
        assert_eq!(cached.ips(), ["10.88.0.5", "fd00::5"]);
    }

    #[tokio::test]
    async fn missing_plugins_and_failing_plugins_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cni = Cni { bin_dirs: vec![dir.path().to_path_buf()] };
        let list =
            NetworkList::parse(r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"fake"}]}"#, Path::new("n"))
                .unwrap();
        let attachment = Attachment {
            container_id: "c1".into(),
            netns: "/proc/self/ns/net".into(),
            if_name: "eth0".into(),
            args: vec![("K8S_POD_NAME".into(), "p".into())],
            port_mappings: Vec::new(),
        };
        let err = cni.add(&list, &attachment).await.unwrap_err().to_string();
        assert!(err.starts_with("failed to find plugin \"fake\" in path"), "{err}");
        // A plugin that reports a CNI error, and one that echoes its environment and input as the result.
        let fake = dir.path().join("fake");
        std::fs::write(
            &fake,
            "#!/bin/sh\nif [ \"$CNI_COMMAND\" = DEL ]; then echo '{\"code\":11,\"msg\":\"no such thing\",\"details\":\"really\"}'; exit 1; fi\n\
             read -r input; printf '{\"ips\":[{\"address\":\"10.1.0.2/24\"}],\"args\":\"%s\",\"in\":%s}' \"$CNI_ARGS\" \"$input\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let cached = cni.add(&list, &attachment).await.unwrap();
        assert_eq!(cached.ips(), ["10.1.0.2"]);
        assert_eq!(cached.result["args"], "IgnoreUnknown=1;K8S_POD_NAME=p");
        assert_eq!(
            (cached.result["in"]["name"].as_str(), cached.result["in"]["cniVersion"].as_str()),
            (Some("n"), Some("1.0.0"))
        );
        let err = cni.del(&cached).await.unwrap_err().to_string();
        assert_eq!(err, "plugin type=\"fake\" failed (DEL): no such thing: really");
    }
}
