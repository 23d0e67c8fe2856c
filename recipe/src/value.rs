//! The validated scalars of a recipe: each type checks its value while it is read and names what
//! it allows (`expected a positive number, got "fast"`); the field path is added by
//! [`crate::Recipe::from_yaml`].

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A YAML scalar of the wrong kind, rendered the way the user wrote it.
fn describe(unexp: de::Unexpected) -> String {
    match unexp {
        de::Unexpected::Str(s) => format!("{s:?}"),
        de::Unexpected::Float(f) => format!("{f}"),
        de::Unexpected::Signed(i) => format!("{i}"),
        de::Unexpected::Unsigned(u) => format!("{u}"),
        de::Unexpected::Bool(b) => format!("{b}"),
        de::Unexpected::Unit => "null".to_string(),
        other => other.to_string(),
    }
}

macro_rules! bounded_number {
    ($name:ident, $inner:ty, $expect:literal, |$v:ident| $ok:expr) => {
        #[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expect)
                    }
                    fn visit_f64<E: de::Error>(self, x: f64) -> Result<$name, E> {
                        let as_inner = x as $inner;
                        if (as_inner as f64) != x {
                            return Err(E::custom(format!("expected {}, got {x}", $expect)));
                        }
                        let $v = as_inner;
                        if $ok {
                            Ok($name(as_inner))
                        } else {
                            Err(E::custom(format!("expected {}, got {x}", $expect)))
                        }
                    }
                    fn visit_i64<E: de::Error>(self, x: i64) -> Result<$name, E> {
                        self.visit_f64(x as f64)
                    }
                    fn visit_u64<E: de::Error>(self, x: u64) -> Result<$name, E> {
                        self.visit_f64(x as f64)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$name, E> {
                        Err(E::custom(format!(
                            "expected {}, got {}",
                            $expect,
                            describe(de::Unexpected::Str(s))
                        )))
                    }
                    fn visit_bool<E: de::Error>(self, b: bool) -> Result<$name, E> {
                        Err(E::custom(format!("expected {}, got {b}", $expect)))
                    }
                    fn visit_unit<E: de::Error>(self) -> Result<$name, E> {
                        Err(E::custom(format!("expected {}, got null", $expect)))
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

bounded_number!(PositiveF64, f64, "a positive number", |v| v > 0.0
    && v.is_finite());
bounded_number!(NonNegativeF64, f64, "a number >= 0", |v| v >= 0.0
    && v.is_finite());
bounded_number!(Fraction, f64, "a number in [0, 1)", |v| (0.0..1.0)
    .contains(&v));
bounded_number!(OpenFraction, f64, "a number in (0, 1)", |v| v > 0.0
    && v < 1.0);
bounded_number!(PositiveInt, usize, "a positive integer", |v| v > 0);
bounded_number!(Count, usize, "an integer >= 0", |v| v < usize::MAX);
