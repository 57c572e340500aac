//! Image references normalised like upstream (`busybox` -> `docker.io/library/busybox:latest`) and the default
//! pull policy that depends on the tag.

use oci_client::Reference;

use super::error::{ImageError, Result};

/// Parses and normalises an image reference as written in a pod spec.
pub fn normalise(image: &str) -> Result<Reference> {
    let invalid = |reason: String| ImageError::InvalidName { name: image.to_owned(), reason };
    if image.trim() != image || image.is_empty() {
        return Err(invalid("invalid reference format".into()));
    }
    let reference: Reference = image.parse().map_err(|e: oci_client::ParseError| invalid(e.to_string()))?;
    if reference.repository().chars().any(|c| c.is_ascii_uppercase()) {
        return Err(invalid("repository name must be lowercase".into()));
    }
    Ok(reference)
}

/// `registry/repository` without tag or digest: the name an image ID is formed from.
pub fn repository_name(reference: &Reference) -> String {
    format!("{}/{}", reference.registry(), reference.repository())
}

/// The image ID the kubelet reports in `containerStatuses[].imageID`: `docker.io/library/busybox@sha256:…`.
pub fn repo_digest(reference: &Reference, manifest_digest: &str) -> String {
    format!("{}@{manifest_digest}", repository_name(reference))
}

/// A container's `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The policy for a container: the one it names, or upstream's default (`Always` for `:latest` or no tag
    /// and no digest, otherwise `IfNotPresent`). An unknown value is an error (the API server rejects it too).
    pub fn for_container(image: &str, given: Option<&str>) -> Result<PullPolicy, String> {
        match given {
            Some("Always") => Ok(PullPolicy::Always),
            Some("IfNotPresent") => Ok(PullPolicy::IfNotPresent),
            Some("Never") => Ok(PullPolicy::Never),
            None | Some("") => Ok(default_policy(image)),
            Some(other) => Err(format!("unknown imagePullPolicy {other:?}")),
        }
    }
}

/// Upstream's defaulting (pkg/apis/core/v1/defaults.go): looks at the tag as written, before normalisation.
fn default_policy(image: &str) -> PullPolicy {
    if image.contains('@') {
        return PullPolicy::IfNotPresent;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        None => PullPolicy::Always,
        Some((_, "latest")) => PullPolicy::Always,
        Some(_) => PullPolicy::IfNotPresent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_upstream() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("kube/agnhost:2.1", "docker.io/kube/agnhost:2.1"),
            ("127.0.0.1:5000/busybox", "127.0.0.1:5000/busybox:latest"),
            ("localhost/a/b:c", "localhost/a/b:c"),
            ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
        ];
        for (given, want) in cases {
            assert_eq!(normalise(given).unwrap().to_string(), want, "{given}");
        }
        let digest = format!("busybox@sha256:{}", "a".repeat(64));
        let r = normalise(&digest).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(
            repo_digest(&r, r.digest().unwrap()),
            format!("docker.io/library/busybox@sha256:{}", "a".repeat(64))
        );
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "Busybox", "busy box", " busybox", "busybox@sha256:abc", "a:b:c", "-x/y"] {
            let err = normalise(bad).unwrap_err();
            assert!(matches!(err, ImageError::InvalidName { .. }), "{bad:?} gave {err}");
        }
    }

    #[test]
    fn default_policy_follows_the_tag() {
        let p = |image| PullPolicy::for_container(image, None).unwrap();
        assert_eq!(p("busybox"), PullPolicy::Always);
        assert_eq!(p("busybox:latest"), PullPolicy::Always);
        assert_eq!(p("127.0.0.1:5000/busybox"), PullPolicy::Always);
        assert_eq!(p("127.0.0.1:5000/busybox:1.0"), PullPolicy::IfNotPresent);
        assert_eq!(p(&format!("busybox@sha256:{}", "b".repeat(64))), PullPolicy::IfNotPresent);
        assert_eq!(PullPolicy::for_container("busybox", Some("Never")).unwrap(), PullPolicy::Never);
        assert!(PullPolicy::for_container("busybox", Some("Sometimes")).is_err());
    }
}
