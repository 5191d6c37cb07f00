//! Prices and costs as values: what a model's tokens cost ([`Price`]), a
//! price in force from a time on ([`PriceVersion`]), amounts of money as
//! exact integers ([`Cost`]), and the one rule that turns an event's tokens
//! into its cost ([`Price::cost_of`]).
//!
//! Money is never a floating-point number here. A price is an integer
//! number of micro-units of the operator's currency per million tokens
//! (2.50 a million is 2,500,000); a cost is an integer number of nano-units.
//! An event's cost is its five token counts, each at its own price, summed
//! exactly and then rounded once to the nearest nano-unit (halves up).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::invalid::Invalid;
use crate::model::time::Timestamp;

/// The highest price accepted for a million tokens: 10,000 units.
pub const MAX_PRICE_MICROS: i64 = 10_000 * 1_000_000;

/// What a model's tokens cost: for each of an event's five token counts,
/// micro-units of the operator's currency per million tokens. Each count is
/// priced on its own; keytally does not subtract cached or reasoning tokens
/// from the prompt or completion counts a gateway records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per million prompt tokens.
    #[serde(default)]
    pub prompt: Micros,
    /// Per million completion tokens.
    #[serde(default)]
    pub completion: Micros,
    /// Per million prompt tokens read from cache.
    #[serde(default)]
    pub cache_read: Micros,
    /// Per million prompt tokens written to cache.
    #[serde(default)]
    pub cache_creation: Micros,
    /// Per million reasoning tokens.
    #[serde(default)]
    pub reasoning: Micros,
}

impl Price {
    /// The five prices in the order of the `prices` table's columns.
    pub(crate) fn micros(&self) -> [i64; 5] {
        [
            self.prompt.0,
            self.completion.0,
            self.cache_read.0,
            self.cache_creation.0,
            self.reasoning.0,
        ]
    }

    /// The price with the table's five columns, in their order.
    pub(crate) fn from_micros(micros: [i64; 5]) -> Price {
        let [prompt, completion, cache_read, cache_creation, reasoning] = micros.map(Micros);
        Price {
            prompt,
            completion,
            cache_read,
            cache_creation,
            reasoning,
        }
    }

    /// Checks every price against the limits.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        for micros in self.micros() {
            if !(0..=MAX_PRICE_MICROS).contains(&micros) {
                return Err(Invalid::new(
                    "price",
                    format!(
                        "{} a million tokens is not between 0 and {}",
                        Micros(micros),
                        Micros(MAX_PRICE_MICROS)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// What an event's token counts (`NewEvent::token_counts`) cost at
    /// this price, in nano-units: each count at its price, summed exactly,
    /// rounded to the nearest nano-unit.
    pub fn cost_of(&self, tokens: [i64; 5]) -> Cost {
        // Tokens times micro-units a million tokens is pico-units.
        let picos: i128 = tokens
            .iter()
            .zip(self.micros())
            .map(|(&tokens, micros)| i128::from(tokens) * i128::from(micros))
            .sum();
        // Validated events and prices keep this far inside an i64: at most
        // five counts of 2^31 tokens at 10^10 micro-units, 10^17 nano-units.
        Cost(i64::try_from((picos + 500) / 1000).unwrap_or(i64::MAX))
    }
}

/// The SQL expression of [`Price::cost_of`] for an event's token columns
/// (`BIGINT`s) prefixed `event` and a price's columns prefixed `price`, in
/// nano-units as a `BIGINT`, exact either way: summed as `BIGINT`s where
/// no product can overflow one (the sum of the counts times the highest
/// of the five prices at most `i64::MAX - 500`: up to 922,337,203 tokens
/// at the highest price, below 859 currency units per million tokens
/// with every count at its highest), else as `NUMERIC`s, which take 8 ms
/// more of a 10,000-event batch's 160.
pub(crate) fn cost_sql(event: &str, price: &str) -> String {
    let columns = [
        ("prompt_tokens", "prompt_micros"),
        ("completion_tokens", "completion_micros"),
        ("cache_read_tokens", "cache_read_micros"),
        ("cache_creation_tokens", "cache_creation_micros"),
        ("reasoning_tokens", "reasoning_micros"),
    ];
    let sum_of = |term: &dyn Fn(&str, &str) -> String, separator: &str| {
        columns
            .map(|(tokens, micros)| term(tokens, micros))
            .join(separator)
    };
    let exact = sum_of(
        &|tokens, micros| format!("CAST({event}.{tokens} AS NUMERIC) * {price}.{micros}"),
        " + ",
    );
    let fast = sum_of(
        &|tokens, micros| format!("{event}.{tokens} * {price}.{micros}"),
        " + ",
    );
    let counts = sum_of(&|tokens, _| format!("{event}.{tokens}"), " + ");
    let highest = sum_of(&|_, micros| format!("{price}.{micros}"), ", ");
    let limit = i64::MAX - 500;
    format!(
        "CASE WHEN GREATEST({highest}) <= {limit} / GREATEST({counts}, 1) \
         THEN ({fast} + 500) / 1000 \
         ELSE CAST(div({exact} + 500, 1000) AS BIGINT) END"
    )
}

/// A price in micro-units of the operator's currency (per million
/// tokens). It reads and shows as a decimal with up to six places
/// (`"2.5"`, `"0.075"`); JSON may give it as such a string or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Micros(pub i64);

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&decimal(i128::from(self.0), 6))
    }
}

impl FromStr for Micros {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<Micros, Invalid> {
        parse_decimal(text, 6, "price", "a price").map(Micros)
    }
}

impl Serialize for Micros {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Micros {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Micros, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a price: a decimal number such as 2.50")]
        enum Given {
            Text(String),
            Number(serde_json::Number),
        }
        let text = match Given::deserialize(deserializer)? {
            Given::Text(text) => text,
            Given::Number(number) => number.to_string(),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An amount of the operator's currency in nano-units: an event's cost, or
/// a total of costs. It shows as a decimal with nine places at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Cost(pub i64);

impl Cost {
    /// The amount in nano-units.
    pub fn nanos(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&decimal(i128::from(self.0), 9))
    }
}

impl FromStr for Cost {
    type Err = Invalid;

    /// An amount as a decimal with up to nine places (`"25.00"`).
    fn from_str(text: &str) -> Result<Cost, Invalid> {
        parse_decimal(text, 9, "amount", "an amount").map(Cost)
    }
}

impl Serialize for Cost {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A model's price from a time on, until its next version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriceVersion {
    /// The model, by name.
    pub model: String,
    /// When the price takes effect.
    pub effective_from: Timestamp,
    /// The price.
    #[serde(flatten)]
    pub price: Price,
}

/// `value / 10^places` as a decimal: at least two places, trailing zeros
/// beyond them dropped.
fn decimal(value: i128, places: u32) -> String {
    let scale = 10i128.pow(places);
    let sign = if value < 0 { "-" } else { "" };
    let magnitude = value.unsigned_abs();
    let whole = magnitude / scale.unsigned_abs();
    let fraction = format!(
        "{:0width$}",
        magnitude % scale.unsigned_abs(),
        width = places as usize
    );
    let trimmed = fraction.trim_end_matches('0');
    let shown = if trimmed.len() < 2 {
        &fraction[..2]
    } else {
        trimmed
    };
    format!("{sign}{whole}.{shown}")
}

/// Parses a non-negative decimal with at most `places` places into an
/// integer number of `10^-places` units.
fn parse_decimal(text: &str, places: u32, field: &'static str, what: &str) -> Result<i64, Invalid> {
    let refuse = |why: &str| {
        Invalid::new(
            field,
            format!("{text:?} is not {what}: {why} (write a decimal such as 2.50 or 0.075)"),
        )
    };
    let trimmed = text.trim();
    let (whole, fraction) = match trimmed.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (trimmed, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return Err(refuse("it is empty"));
    }
    if !whole
        .chars()
        .chain(fraction.chars())
        .all(|c| c.is_ascii_digit())
    {
        return Err(refuse("only digits and one decimal point"));
    }
    if fraction.len() > places as usize {
        return Err(refuse(&format!("more than {places} decimal places")));
    }
    let scale = 10i64.pow(places);
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| refuse("too large"))?
    };
    let fraction_value: i64 = if fraction.is_empty() {
        0
    } else {
        let padded = format!("{fraction:0<width$}", width = places as usize);
        padded.parse().map_err(|_| refuse("too large"))?
    };
    whole
        .checked_mul(scale)
        .and_then(|units| units.checked_add(fraction_value))
        .ok_or_else(|| refuse("too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_read_and_show_as_decimals() -> Result<(), Invalid> {
        assert_eq!("2.50".parse::<Micros>()?, Micros(2_500_000));
        assert_eq!("0.075".parse::<Micros>()?, Micros(75_000));
        assert_eq!("3".parse::<Micros>()?, Micros(3_000_000));
        assert_eq!(".5".parse::<Micros>()?, Micros(500_000));
        assert_eq!(Micros(2_500_000).to_string(), "2.50");
        assert_eq!(Micros(18_750).to_string(), "0.01875");
        assert_eq!(Cost(1_234_500).to_string(), "0.0012345");
        assert_eq!(Cost(2_000_000_000).to_string(), "2.00");
        for bad in [
            "",
            "-1",
            "1e3",
            "0.0000001",
            "1.2.3",
            "one",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<Micros>().is_err(), "{bad:?}");
        }
        Ok(())
    }

    #[test]
    fn a_cost_is_summed_exactly_and_rounded_once() -> Result<(), Invalid> {
        let price = Price {
            prompt: "0.01875".parse()?,
            completion: "2.50".parse()?,
            ..Price::default()
        };
        // 3 × 18,750 + 2,500,000 pico-units = 2,556.25 nano-units.
        assert_eq!(price.cost_of([3, 1, 0, 0, 0]), Cost(2_556));
        // 2,612.5 rounds up.
        assert_eq!(price.cost_of([6, 1, 0, 0, 0]), Cost(2_613));
        Ok(())
    }
}
