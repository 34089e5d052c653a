//! The names as strings in manifests and `/config`: serialized as their canonical
//! text, deserialized through their parser, so that a manifest cannot hold a name
//! the wire would refuse.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Authority, ClusterName, SpiffeId, TrustDomain};

/// Deserializes a string through `parse`, failing inside the deserializer so the
/// error carries the field path (an error made after `String::deserialize` returns
/// would be reported at the enclosing mapping). Other crates' string-typed fields
/// deserialize through it too.
pub fn de_str<'de, D, T, E>(d: D, parse: fn(&str) -> Result<T, E>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    E: fmt::Display,
{
    struct Parse<T, E>(fn(&str) -> Result<T, E>);
    impl<T, E: fmt::Display> serde::de::Visitor<'_> for Parse<T, E> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<Er: serde::de::Error>(self, s: &str) -> Result<T, Er> {
            (self.0)(s).map_err(Er::custom)
        }
    }
    d.deserialize_str(Parse(parse))
}

macro_rules! as_string {
    ($($ty:ident),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                de_str(d, Self::parse)
            }
        }
    )*};
}

as_string!(Authority, ClusterName, SpiffeId, TrustDomain);
