//! Prometheus endpoints: `/metrics` (the agent's own series under kubelet's names, [`kubelet`]), `/metrics/resource`
//! (what the metrics-server reads, [`resource`]; the API client's requests counted by [`rest_client`]) and `/metrics/cadvisor` (per-container series under cAdvisor's
//! names, [`cadvisor`]). Series are built with the `prometheus` crate's model and text encoder.

pub mod cadvisor;
pub mod kubelet;
pub mod resource;
pub mod rest_client;

use jiff::Timestamp;
use prometheus::Encoder;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

/// The text exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Text exposition of `families` (families without samples are left out, as client_golang does).
pub fn encode(families: &[MetricFamily]) -> String {
    let families: Vec<MetricFamily> = families.iter().filter(|f| !f.get_metric().is_empty()).cloned().collect();
    let mut out = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// A family under construction: one name, help and type, samples added one by one.
pub struct Family(MetricFamily);

impl Family {
    pub fn gauge(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::GAUGE)
    }

    pub fn counter(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::COUNTER)
    }

    fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut f = MetricFamily::default();
        f.set_name(name.into());
        f.set_help(help.into());
        f.set_field_type(kind);
        Family(f)
    }

    /// Adds a sample with `labels` (name, value) and an optional timestamp.
    pub fn add(&mut self, labels: &[(&str, &str)], value: f64, at: Option<Timestamp>) {
        let mut m = Metric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        if self.0.get_field_type() == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        if let Some(at) = at {
            m.set_timestamp_ms(at.as_millisecond());
        }
        self.0.mut_metric().push(m);
    }

    pub fn done(self) -> MetricFamily {
        self.0
    }
}

#[cfg(test)]
pub mod tests {
    /// A minimal parser of the text format for tests: (name, labels, value, timestamp) per sample line, after
    /// checking every family has HELP and TYPE before its samples.
    pub type Sample = (String, Vec<(String, String)>, f64, Option<i64>);

    pub fn parse(text: &str) -> Vec<Sample> {
        let mut typed = std::collections::HashSet::new();
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split_whitespace().next().unwrap().to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (name, rest) = match line.find('{') {
                Some(i) => {
                    let end = line.rfind('}').expect("closing brace");
                    (&line[..i], (Some(&line[i + 1..end]), &line[end + 1..]))
                }
                None => {
                    let i = line.find(' ').expect("a value");
                    (&line[..i], (None, &line[i..]))
                }
            };
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            assert!(typed.contains(name) || typed.contains(base), "{name} has no TYPE line");
            let labels = rest
                .0
                .map(|l| {
                    l.split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label=\"value\"");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut fields = rest.1.split_whitespace();
            let value: f64 = match fields.next().expect("value") {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let ts = fields.next().map(|t| t.parse().expect("timestamp"));
            out.push((name.to_string(), labels, value, ts));
        }
        out
    }

    #[test]
    fn families_encode_with_labels_and_timestamps() {
        let mut f = super::Family::counter("x_total", "A counter.");
        f.add(
            &[("pod", "a"), ("namespace", "b")],
            1.5,
            Some(jiff::Timestamp::from_millisecond(1_700_000_000_123).unwrap()),
        );
        let empty = super::Family::gauge("empty", "No samples.");
        let text = super::encode(&[f.done(), empty.done()]);
        assert!(text.contains("# TYPE x_total counter"), "{text}");
        assert!(!text.contains("empty"), "{text}");
        let samples = parse(&text);
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].1, [("pod".to_string(), "a".to_string()), ("namespace".into(), "b".into())]);
        assert_eq!((samples[0].2, samples[0].3), (1.5, Some(1_700_000_000_123)));
    }
}
