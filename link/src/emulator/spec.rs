//! The recipe's link description and the parsers for its human-written quantities:
//!
//! ```yaml
//! link: {rate: 2gbps, rtt: 40ms, jitter: 2ms, loss: 0.1%, queue: 10MB, outages: [{at: 120s, for: 30s}]}
//! ```
//!
//! Every quantity needs its unit (`40` could be seconds or milliseconds, `0.1` a fraction or a
//! percentage), except a bare `0` and a bare byte count. Rates and byte sizes use decimal SI
//! prefixes (`1gbps` = 10⁹ bit/s, `1MB` = 10⁶ bytes) like link and NIC datasheets; `KiB`/`MiB`/
//! `GiB` are binary. The same parsers back `FromStr`, so a CLI can reuse them for its flags.

use serde::{Deserialize, Deserializer};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct ParseError {
    pub what: &'static str,
    pub input: String,
    pub reason: String,
}

fn err(what: &'static str, input: &str, reason: impl Into<String>) -> ParseError {
    ParseError {
        what,
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// Splits `"2.5 Gbps"` into `(2.5, "gbps")` (the unit lower-cased, surrounding blanks removed).
fn split_number(what: &'static str, input: &str) -> Result<(f64, String), ParseError> {
    let s = input.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    if number.is_empty() {
        return Err(err(what, input, "expected a number first"));
    }
    let value: f64 = number
        .replace('_', "")
        .parse()
        .map_err(|_| err(what, input, format!("{number:?} is not a number")))?;
    if !value.is_finite() {
        return Err(err(what, input, "not a finite number"));
    }
    Ok((value, unit.trim().to_ascii_lowercase()))
}

/// A link rate in bits per second: `200mbps`, `2gbps`, `2.5Gbps`, `100kbit`, `1gbit/s`.
pub fn parse_rate(input: &str) -> Result<u64, ParseError> {
    const WHAT: &str = "rate";
    let (value, unit) = split_number(WHAT, input)?;
    let unit = unit
        .strip_suffix("/s")
        .map(|u| u.to_string())
        .unwrap_or(unit);
    let scale = match unit.as_str() {
        "bps" | "bit" | "b" => 1.0,
        "kbps" | "kbit" | "k" => 1e3,
        "mbps" | "mbit" | "m" => 1e6,
        "gbps" | "gbit" | "g" => 1e9,
        "tbps" | "tbit" | "t" => 1e12,
        "" => {
            return Err(err(
                WHAT,
                input,
                "missing unit: write for example 200mbps or 2gbps",
            ))
        }
        other => {
            return Err(err(
                WHAT,
                input,
                format!("unknown unit {other:?} (use bps, kbps, mbps, gbps or tbps)"),
            ))
        }
    };
    let bps = value * scale;
    if bps < 1.0 {
        return Err(err(WHAT, input, "a rate must be at least 1 bit/s"));
    }
    if bps > 1e15 {
        return Err(err(WHAT, input, "more than 1 Pbit/s is not a link rate"));
    }
    Ok(bps.round() as u64)
}

/// A duration: `40ms`, `2s`, `120s`, `1.5s`, `500us`, `2m`, `1h`; a bare `0` is zero.
pub fn parse_duration(input: &str) -> Result<Duration, ParseError> {
    const WHAT: &str = "duration";
    let (value, unit) = split_number(WHAT, input)?;
    let seconds = match unit.as_str() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "" if value == 0.0 => 0.0,
        "" => {
            return Err(err(
                WHAT,
                input,
                "missing unit: write for example 40ms or 2s",
            ))
        }
        other => {
            return Err(err(
                WHAT,
                input,
                format!("unknown unit {other:?} (use ns, us, ms, s, m or h)"),
            ))
        }
    };
    let secs = value * seconds;
    if secs > 365.0 * 86400.0 {
        return Err(err(WHAT, input, "longer than a year"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A probability written as a percentage: `0.1%` → 0.001; a bare `0` is zero.
pub fn parse_percent(input: &str) -> Result<f64, ParseError> {
    const WHAT: &str = "percentage";
    let (value, unit) = split_number(WHAT, input)?;
    let fraction = match unit.as_str() {
        "%" => value / 100.0,
        "" if value == 0.0 => 0.0,
        "" => {
            return Err(err(
                WHAT,
                input,
                "missing %: write for example 0.1% (a bare number would be ambiguous)",
            ))
        }
        other => return Err(err(WHAT, input, format!("expected %, found {other:?}"))),
    };
    if fraction > 1.0 {
        return Err(err(WHAT, input, "more than 100%"));
    }
    Ok(fraction)
}

/// A byte size: `10MB`, `512KiB`, `1500` (bytes), `64kb`.
pub fn parse_bytes(input: &str) -> Result<u64, ParseError> {
    const WHAT: &str = "byte size";
    let (value, unit) = split_number(WHAT, input)?;
    let scale = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(err(
                WHAT,
                input,
                format!("unknown unit {other:?} (use B, KB, MB, GB, KiB, MiB or GiB)"),
            ))
        }
    };
    let bytes = value * scale;
    if bytes > 1e15 {
        return Err(err(WHAT, input, "too large"));
    }
    Ok(bytes.round() as u64)
}

/// What a YAML/JSON scalar may hold: quantities usually come as strings, `0` as a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Int(u64),
    Float(f64),
    Str(String),
}

impl Scalar {
    fn text(self) -> String {
        match self {
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Str(s) => s,
        }
    }
}

fn with<'de, D, T>(d: D, parse: fn(&str) -> Result<T, ParseError>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let text = Scalar::deserialize(d)?.text();
    parse(&text).map_err(serde::de::Error::custom)
}

pub fn de_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    with(d, parse_rate).map(Some)
}
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    with(d, parse_duration)
}
pub fn de_percent<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    with(d, parse_percent)
}
pub fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    with(d, parse_bytes).map(Some)
}

pub fn de_mtu<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let mtu = u16::deserialize(d)?;
    crate::quic::check_mtu(mtu)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("mtu {e}")))
}

/// A scheduled outage: from `at` (time since the emulator started) for `duration`, every packet
/// in either direction is dropped, as when a region is partitioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    #[serde(deserialize_with = "de_duration")]
    pub at: Duration,
    #[serde(rename = "for", deserialize_with = "de_duration")]
    pub duration: Duration,
}

impl Outage {
    pub fn end(&self) -> Duration {
        self.at.saturating_add(self.duration)
    }
}

/// A link as a recipe describes it. Every field is optional: an empty spec is a perfect link
/// (no rate limit, no delay, no loss).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// Bits per second in each direction; absent: unlimited.
    #[serde(default, rename = "rate", deserialize_with = "de_rate")]
    pub rate_bps: Option<u64>,
    /// Round-trip propagation delay, split evenly between the two directions.
    #[serde(default, deserialize_with = "de_duration")]
    pub rtt: Duration,
    /// Each packet's one-way delay varies uniformly within ± this (packets are not reordered).
    #[serde(default, deserialize_with = "de_duration")]
    pub jitter: Duration,
    /// Probability that a packet is lost, independently per packet and direction.
    #[serde(default, deserialize_with = "de_percent")]
    pub loss: f64,
    /// Bottleneck queue in bytes per direction; absent: one bandwidth-delay product.
    #[serde(default, rename = "queue", deserialize_with = "de_bytes")]
    pub queue_bytes: Option<u64>,
    #[serde(default)]
    pub outages: Vec<Outage>,
    /// The path MTU in bytes (IP packet, headers included); absent: 1500. Larger datagrams are
    /// dropped.
    #[serde(default, deserialize_with = "de_mtu")]
    pub mtu: Option<u16>,
    /// Seed of the loss and jitter draws; absent: 0 (runs are reproducible by default).
    #[serde(default)]
    pub seed: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("200mbps"), Ok(200_000_000));
        assert_eq!(parse_rate("2gbps"), Ok(2_000_000_000));
        assert_eq!(parse_rate("2.5Gbps"), Ok(2_500_000_000));
        assert_eq!(parse_rate(" 100 kbit/s "), Ok(100_000));
        assert_eq!(parse_rate("1gbit"), Ok(1_000_000_000));
        for bad in [
            "",
            "gbps",
            "2",
            "2gbs",
            "0mbps",
            "-1gbps",
            "1.2.3gbps",
            "nan",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_rate("2gbs").unwrap_err().to_string();
        assert!(e.contains("unknown unit \"gbs\""), "{e}");
        let e = parse_rate("2000").unwrap_err().to_string();
        assert!(e.contains("missing unit"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("40ms"), Ok(Duration::from_millis(40)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["40", "40 msec", "ms", "1e3ms", "2y"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn percentages_and_bytes() {
        assert_eq!(parse_percent("0.1%"), Ok(0.001));
        assert_eq!(parse_percent("1 %"), Ok(0.01));
        assert_eq!(parse_percent("0"), Ok(0.0));
        assert!(parse_percent("0.1").is_err());
        assert!(parse_percent("150%").is_err());
        assert_eq!(parse_bytes("10MB"), Ok(10_000_000));
        assert_eq!(parse_bytes("512KiB"), Ok(524_288));
        assert_eq!(parse_bytes("1500"), Ok(1500));
        assert!(parse_bytes("3 parsecs").is_err());
    }

    #[test]
    fn recipe_form() {
        let spec: LinkSpec = serde_yaml::from_str(
            "{rate: 2gbps, rtt: 40ms, jitter: 2ms, loss: 0.1%, outages: [{at: 120s, for: 30s}]}",
        )
        .unwrap();
        assert_eq!(spec.rate_bps, Some(2_000_000_000));
        assert_eq!(spec.rtt, Duration::from_millis(40));
        assert_eq!(spec.jitter, Duration::from_millis(2));
        assert_eq!(spec.loss, 0.001);
        assert_eq!(spec.queue_bytes, None);
        assert_eq!(
            spec.outages,
            vec![Outage {
                at: Duration::from_secs(120),
                duration: Duration::from_secs(30)
            }]
        );
        let empty: LinkSpec = serde_yaml::from_str("{}").unwrap();
        assert_eq!(empty, LinkSpec::default());
        let zero: LinkSpec = serde_yaml::from_str("{loss: 0, jitter: 0, queue: 65536}").unwrap();
        let jumbo: LinkSpec = serde_yaml::from_str("{mtu: 9000}").unwrap();
        assert_eq!(jumbo.mtu, Some(9000));
        let e = serde_yaml::from_str::<LinkSpec>("{mtu: 576}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mtu 576 is below"), "{e}");
        assert_eq!(zero.queue_bytes, Some(65536));
        // Errors name the field and the problem.
        let e = serde_yaml::from_str::<LinkSpec>("{rate: 2gbs}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid rate \"2gbs\""), "{e}");
        let e = serde_yaml::from_str::<LinkSpec>("{rtt: 40}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing unit"), "{e}");
        assert!(serde_yaml::from_str::<LinkSpec>("{latency: 40ms}").is_err());
    }
}
