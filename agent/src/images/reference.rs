//! Image references normalised like upstream (`busybox` -> `docker.io/library/busybox:latest`) and the default
//! pull policy that depends on the tag.

use oci_client::Reference;

use super::error::{ImageError, Result};

/// Parses and normalises an image reference as written in a pod spec.
///
/// The grammar is distribution/reference's, checked by hand: `oci_client`'s own parser compiles a Unicode
/// regex on first use whose automaton stays resident for the life of the process (4.3 MiB, a sixth of an idle
/// agent's anonymous memory).
pub fn normalise(image: &str) -> Result<Reference> {
    let invalid = |reason: &str| ImageError::InvalidName { name: image.to_owned(), reason: reason.to_owned() };
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    // A ':' after the last '/' starts the tag; one before it belongs to the registry's port.
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    let (domain, path) = match name.split_once('/') {
        Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => (Some(first), path),
        _ => (None, name),
    };
    if domain.is_some_and(|d| !valid_domain(d)) || !valid_path(path) {
        let lowercase = path.to_ascii_lowercase();
        return Err(invalid(if path != lowercase && valid_path(&lowercase) {
            "repository name must be lowercase"
        } else {
            "invalid reference format"
        }));
    }
    if tag.is_some_and(|t| !valid_tag(t)) {
        return Err(invalid("invalid reference format"));
    }
    if let Some(digest) = digest {
        check_digest(digest).map_err(invalid)?;
    }
    let registry = match domain {
        None | Some("index.docker.io") => "docker.io",
        Some(d) => d,
    };
    let repository = match (registry, path.contains('/')) {
        ("docker.io", false) => format!("library/{path}"),
        _ => path.to_owned(),
    };
    if repository.len() > 255 {
        return Err(invalid("repository name must not be more than 255 characters"));
    }
    let (registry, tag, digest) = (registry.to_owned(), tag.map(str::to_owned), digest.map(str::to_owned));
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => Reference::with_tag_and_digest(registry, repository, tag, digest),
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or_else(|| "latest".into())),
    })
}

/// `host[:port]`: dot-separated components of ASCII letters, digits and inner hyphens.
fn valid_domain(domain: &str) -> bool {
    let (host, port) = match domain.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    let component = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !c.starts_with('-')
            && !c.ends_with('-')
    };
    host.split('.').all(component) && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `/`-separated components, each `[a-z0-9]+` runs joined by one separator: `.`, `_`, `__` or any number of `-`.
fn valid_path(path: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    path.split('/').all(|component| {
        let mut rest = component.as_bytes();
        loop {
            let run = rest.iter().take_while(|b| alnum(b)).count();
            if run == 0 {
                return false;
            }
            rest = &rest[run..];
            if rest.is_empty() {
                return true;
            }
            let sep = rest.iter().take_while(|b| matches!(b, b'.' | b'_' | b'-')).count();
            let ok = matches!(&rest[..sep], b"." | b"_" | b"__") || rest[..sep].iter().all(|b| *b == b'-');
            if sep == 0 || !ok {
                return false;
            }
            rest = &rest[sep..];
        }
    })
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    tag.len() <= 128 && tag.bytes().next().is_some_and(word) && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-')
}

/// `algorithm:hex`, with the hex length the algorithm implies (what the registry client accepts).
fn check_digest(digest: &str) -> std::result::Result<(), &'static str> {
    let Some((algorithm, hex)) = digest.split_once(':') else { return Err("invalid checksum digest format") };
    if algorithm.is_empty() || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("invalid reference format");
    }
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm"),
    };
    if hex.len() != want {
        return Err("invalid checksum digest length");
    }
    Ok(())
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
            ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
            ("Quay.io/a__b/c-d--e.f_g:V1_x.y-z", "Quay.io/a__b/c-d--e.f_g:V1_x.y-z"),
            ("localhost:5000/a", "localhost:5000/a:latest"),
            ("example/busybox", "docker.io/example/busybox:latest"),
        ];
        for (given, want) in cases {
            assert_eq!(normalise(given).unwrap().to_string(), want, "{given}");
        }
        let digest = format!("busybox@sha256:{}", "a".repeat(64));
        let r = normalise(&digest).unwrap();
        assert_eq!(r.tag(), None);
        let both = normalise(&format!("127.0.0.1:5000/x:1@sha256:{}", "c".repeat(64))).unwrap();
        assert_eq!((both.registry(), both.repository(), both.tag()), ("127.0.0.1:5000", "x", Some("1")));
        assert!(normalise(&format!("busybox:{}", "t".repeat(129))).is_err());
        assert!(normalise(&format!("{}/x", "a".repeat(256))).is_err());
        assert_eq!(
            repo_digest(&r, r.digest().unwrap()),
            format!("docker.io/library/busybox@sha256:{}", "a".repeat(64))
        );
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "Busybox",
            "busy box",
            " busybox",
            "busybox ",
            "busybox@sha256:abc",
            "a:b:c",
            "-x/y",
            "a/b/",
            "a//b",
            "a_",
            "a-.b",
            "a___b",
            "busybox:",
            "busybox:-x",
            "busybox:ä",
            "my.registry:port/x",
            "-bad.io/x",
            "busybox@md5:0123456789abcdef0123456789abcdef",
        ] {
            let err = normalise(bad).unwrap_err();
            assert!(matches!(err, ImageError::InvalidName { .. }), "{bad:?} gave {err}");
        }
        let err = normalise("Busybox").unwrap_err().to_string();
        assert!(err.contains("must be lowercase"), "{err}");
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
