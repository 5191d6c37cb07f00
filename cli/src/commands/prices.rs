//! `keytally prices`: set and list what each model's tokens cost.

use std::path::Path;

use keytally::{Error, Micros, Price, PriceVersion, Store, Timestamp};
use serde::Deserialize;

use super::output::Output;
use super::{parse, CliResult};
use crate::PricesCommand;

/// Runs a `prices` subcommand.
pub fn run(store: &Store, command: &PricesCommand, out: &Output) -> CliResult {
    match command {
        PricesCommand::Set {
            model,
            from,
            prompt,
            completion,
            cache_read,
            cache_write,
            reasoning,
            file,
        } => {
            let versions = match (file, model) {
                (Some(file), _) => from_file(file)?,
                (None, Some(model)) => vec![PriceVersion {
                    model: model.clone(),
                    effective_from: effective_from(from.as_deref())?,
                    price: Price {
                        prompt: prompt.parse()?,
                        completion: completion.parse()?,
                        cache_read: cache_read.parse()?,
                        cache_creation: cache_write.parse()?,
                        reasoning: reasoning.parse()?,
                    },
                }],
                (None, None) => {
                    return Err(Error::InvalidInput {
                        field: "--model",
                        reason: "give --model or --file".to_owned(),
                    }
                    .into())
                }
            };
            store.prices().set_all(&versions)?;
            out.print(&versions, || {
                format!("set {}\n", parse::counted(versions.len() as u64, "price"))
            });
            Ok(())
        }
        PricesCommand::List => {
            let versions = store.prices().list()?;
            out.print(&versions, || {
                if versions.is_empty() {
                    return "no prices\n".to_owned();
                }
                // The model column as wide as the longest name.
                let width = versions
                    .iter()
                    .map(|version| version.model.chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(28);
                let mut text = format!(
                    "{:<width$} {:<24} {:>11} {:>11} {:>11} {:>11} {:>11}\n",
                    "model",
                    "from",
                    "prompt",
                    "completion",
                    "cache read",
                    "cache write",
                    "reasoning"
                );
                for version in &versions {
                    let p = &version.price;
                    // `Micros` writes its decimal whole: padded as text.
                    text.push_str(&format!(
                        "{:<width$} {:<24} {:>11} {:>11} {:>11} {:>11} {:>11}\n",
                        version.model,
                        version.effective_from.to_string(),
                        p.prompt.to_string(),
                        p.completion.to_string(),
                        p.cache_read.to_string(),
                        p.cache_creation.to_string(),
                        p.reasoning.to_string()
                    ));
                }
                text
            });
            Ok(())
        }
    }
}

fn effective_from(from: Option<&str>) -> Result<Timestamp, Error> {
    match from {
        Some(text) => parse::time(text),
        None => Ok(Timestamp::now()),
    }
}

/// A price file: `{"prices": [...]}` in JSON, or `[[prices]]` tables in TOML.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    prices: Vec<FilePrice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePrice {
    model: String,
    /// RFC 3339, Unix ms, or a duration ago; now if omitted.
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    prompt: Micros,
    #[serde(default)]
    completion: Micros,
    #[serde(default)]
    cache_read: Micros,
    /// Also `cache_write`, as `--cache-write` and `prices list` name it.
    #[serde(default, alias = "cache_write")]
    cache_creation: Micros,
    #[serde(default)]
    reasoning: Micros,
}

fn from_file(path: &Path) -> Result<Vec<PriceVersion>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| Error::InvalidInput {
        field: "--file",
        reason: format!("{}: {reason}", path.display()),
    };
    let file: PriceFile = if path.extension().is_some_and(|ext| ext == "toml") {
        toml::from_str(&text).map_err(|e| invalid(e.message().to_owned()))?
    } else {
        serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?
    };
    file.prices
        .into_iter()
        .map(|price| {
            Ok(PriceVersion {
                effective_from: effective_from(price.from.as_deref())?,
                model: price.model,
                price: Price {
                    prompt: price.prompt,
                    completion: price.completion,
                    cache_read: price.cache_read,
                    cache_creation: price.cache_creation,
                    reasoning: price.reasoning,
                },
            })
        })
        .collect()
}
