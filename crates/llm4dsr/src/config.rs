//! Flags from the command line or from a TOML config file: every flag of a stage can also be
//! written as a key in that stage's table of the config (`[prepare]`, `[train]`, ...), with the
//! same name as the flag in snake_case. The command line wins over the file, the file over the
//! built-in default. Unknown keys are an error, so a typo never silently falls back to a default.

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// The tables a config may hold: one per stage that reads flags from it.
pub const SECTIONS: &[&str] = &[
    "prepare",
    "score",
    "ground",
    "comm-check",
    "train",
    "evaluate",
    "run",
    "model-convert",
    "inspect-scores",
];

/// A parsed config file: one table per stage.
#[derive(Clone, Debug, Default)]
pub struct ConfigFile {
    pub path: Option<std::path::PathBuf>,
    pub table: toml::Table,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        let c = Self {
            path: Some(path.to_path_buf()),
            table,
        };
        c.check_sections()?;
        Ok(c)
    }

    /// Every top-level key must be a known stage's table, so a misspelt table is an error
    /// rather than a config silently ignored.
    fn check_sections(&self) -> Result<()> {
        for (key, v) in &self.table {
            if !SECTIONS.contains(&key.as_str()) {
                let hint = match SECTIONS.iter().find(|s| **s == key.replace('_', "-")) {
                    Some(s) => format!(" (did you mean [{s}]?)"),
                    None => String::new(),
                };
                bail!(
                    "{}: unknown table [{key}]{hint}; a config holds the tables {}",
                    self.describe(),
                    SECTIONS
                        .iter()
                        .map(|s| format!("[{s}]"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if !v.is_table() {
                bail!("{}: `{key}` must be a table ([{key}])", self.describe());
            }
        }
        Ok(())
    }

    /// A config from text (e.g. one embedded in the binary); `origin` names it in errors.
    pub fn from_str(text: &str, origin: &str) -> Result<Self> {
        let table: toml::Table =
            toml::from_str(text).with_context(|| format!("parsing config {origin}"))?;
        let c = Self {
            path: Some(origin.into()),
            table,
        };
        c.check_sections()?;
        Ok(c)
    }

    /// The `[section]` table, if present.
    pub fn section(&self, section: &str) -> Result<Option<&toml::Table>> {
        match self.table.get(section) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(t)),
            Some(_) => bail!("{}: `{section}` must be a table", self.describe()),
        }
    }

    fn describe(&self) -> String {
        self.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<no config>".into())
    }

    /// Resolve a stage's arguments: command line > `[section]` of the file > defaults.
    pub fn resolve<A>(&self, section: &str, matches: &ArgMatches) -> Result<A>
    where
        A: FromArgMatches + Serialize + DeserializeOwned,
    {
        let parsed = A::from_arg_matches(matches).map_err(|e| anyhow!("{e}"))?;
        let Some(table) = self.section(section)? else {
            return Ok(parsed);
        };
        let mut value = serde_json::to_value(&parsed)?;
        let defaults = value.clone();
        let obj = value
            .as_object_mut()
            .ok_or_else(|| anyhow!("arguments of `{section}` are not a struct"))?;
        for (key, v) in table {
            if !obj.contains_key(key) {
                let mut known: Vec<&String> = obj.keys().collect();
                known.sort();
                bail!(
                    "{}: unknown key `{key}` in [{section}] (known keys: {})",
                    self.describe(),
                    known
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let from_cli = matches!(
                matches.value_source(key),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            if !from_cli {
                obj.insert(key.clone(), serde_json::to_value(v)?);
            }
        }
        serde_json::from_value::<A>(value).map_err(|e| {
            // Name the key: the first whose value alone fails to deserialise.
            let bad = table.iter().find(|(key, v)| {
                let mut one = defaults.clone();
                one[key.as_str()] = serde_json::to_value(v).unwrap_or_default();
                serde_json::from_value::<A>(one).is_err()
            });
            match bad {
                Some((key, v)) => anyhow!(
                    "{}: [{section}] {key} = {v}: wrong type or value ({e})",
                    self.describe()
                ),
                None => anyhow!(
                    "{}: a value in [{section}] has the wrong type ({e})",
                    self.describe()
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(clap::Parser, serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Demo {
        #[arg(long, default_value_t = 5)]
        k_core: u32,
        #[arg(long, default_value_t = 0.0)]
        noise: f64,
        #[arg(long)]
        name: Option<String>,
    }

    fn cfg(text: &str) -> ConfigFile {
        ConfigFile {
            path: None,
            table: toml::from_str(text).unwrap(),
        }
    }

    #[test]
    fn cli_beats_file_beats_default() {
        let c = cfg("[s]\nk_core = 10\nnoise = 0.1\n");
        let m = Demo::command().get_matches_from(["demo", "--noise", "0.2"]);
        let d: Demo = c.resolve("s", &m).unwrap();
        assert_eq!(
            d,
            Demo {
                k_core: 10,
                noise: 0.2,
                name: None
            }
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let c = cfg("[s]\nk_core = 10\nnoise = \"lots\"\n");
        let m = Demo::command().get_matches_from(["demo"]);
        let e = c.resolve::<Demo>("s", &m).unwrap_err().to_string();
        assert!(e.contains("[s] noise = \"lots\""), "{e}");
    }

    #[test]
    fn unknown_or_misspelt_table_is_an_error() {
        let e = ConfigFile::from_str("[prepar]\nseed = 1\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.toml") && e.contains("unknown table [prepar]"),
            "{e}"
        );
        let e = ConfigFile::from_str("[inspect_scores]\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean [inspect-scores]"), "{e}");
        let e = ConfigFile::from_str("seed = 1\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown table [seed]"), "{e}");
        let e = ConfigFile::from_str("score = 1\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a table"), "{e}");
        for s in SECTIONS {
            ConfigFile::from_str(&format!("[{s}]\n"), "c.toml").unwrap();
        }
    }

    #[test]
    fn unknown_key_is_an_error() {
        let c = cfg("[s]\nk_cor = 10\n");
        let m = Demo::command().get_matches_from(["demo"]);
        let e = c.resolve::<Demo>("s", &m).unwrap_err().to_string();
        assert!(e.contains("unknown key `k_cor`"), "{e}");
        let _ = Demo::parse_from(["demo"]);
    }
}
