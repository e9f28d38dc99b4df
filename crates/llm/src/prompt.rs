//! The one prompt template of llm4dsr (Alpaca style, from the LLM4DSR reference code), used
//! for fine-tuning, scoring and generation alike. The reference code used one trailing space
//! after the `### Response:` header and double quotes when training, two spaces and a single
//! quote at inference; here every stage uses exactly the strings below, recorded in manifests
//! through [`template_record`].
//!
//! ```text
//! Below is an instruction ... completes the request.
//!
//! ### Instruction:
//! You are to analyze ... the user's interests.
//!
//! ### Input:
//! User Interaction Sequence: "t1", "t2", ..., "tn"
//!
//! ### Response:
//! Noise Items: "<noise title>"
//! Suggested Replacements: "<replacement title>"
//! ```
//! followed by the tokenizer's EOS token (added as an id, never as text).

/// Version tag of the template; bump it whenever a string below changes.
pub const TEMPLATE_VERSION: &str = "llm4dsr-alpaca-v1";

pub const PREAMBLE: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.";

pub const INSTRUCTION: &str = "You are to analyze a list of item titles provided by a user. Your task is to identify any item(s) that do not align with the main interests reflected by the majority of the items. After identifying these noise items, suggest alternative items that better match the user's interests.";

/// What precedes the titles in the input section.
pub const INPUT_LABEL: &str = "User Interaction Sequence: ";
/// The answer's first line up to and including the opening quote of the noise title.
pub const NOISE_PREFIX: &str = "Noise Items: \"";
/// Between the noise title and the replacement title.
pub const REPLACEMENT_PREFIX: &str = "\"\nSuggested Replacements: \"";
/// Closes a title in the answer; the scorer appends it to every title and generation stops at it.
pub const CLOSE_QUOTE: &str = "\"";

/// `"t1", "t2", ..., "tn"`.
pub fn title_list<S: AsRef<str>>(titles: &[S]) -> String {
    let mut s = String::new();
    for (i, t) in titles.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('"');
        s.push_str(t.as_ref());
        s.push('"');
    }
    s
}

/// Everything up to and including `### Response:\n`.
pub fn prompt_body<S: AsRef<str>>(titles: &[S]) -> String {
    format!(
        "{PREAMBLE}\n\n### Instruction:\n{INSTRUCTION}\n\n### Input:\n{INPUT_LABEL}{}\n\n### Response:\n",
        title_list(titles)
    )
}

/// The scoring prompt: the answer prefilled up to the noise title's opening quote. The next
/// token's distribution is the model's belief about which item is noise.
pub fn scoring_prefix<S: AsRef<str>>(titles: &[S]) -> String {
    format!("{}{NOISE_PREFIX}", prompt_body(titles))
}

/// The generation prompt for a detected noise item: greedy decoding continues with the
/// replacement title and stops at the closing quote.
pub fn generation_prefix<S: AsRef<str>>(titles: &[S], noise_title: &str) -> String {
    format!(
        "{}{noise_title}{REPLACEMENT_PREFIX}",
        scoring_prefix(titles)
    )
}

/// The full SFT text (the caller appends the EOS token id): the window's titles with the swap
/// applied, the intruder's title and the original title.
pub fn sft_text<S: AsRef<str>>(titles: &[S], noise_title: &str, original_title: &str) -> String {
    format!(
        "{}{original_title}{CLOSE_QUOTE}",
        generation_prefix(titles, noise_title)
    )
}

/// The template as recorded in manifests: version and every fixed string.
pub fn template_record() -> serde_json::Value {
    serde_json::json!({
        "version": TEMPLATE_VERSION,
        "preamble": PREAMBLE,
        "instruction": INSTRUCTION,
        "input_label": INPUT_LABEL,
        "noise_prefix": NOISE_PREFIX,
        "replacement_prefix": REPLACEMENT_PREFIX,
        "close_quote": CLOSE_QUOTE,
        "example_scoring_prefix": scoring_prefix(&["t1", "t2"]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_nest() {
        let t = ["Heat (1995)", "Alien (1979)"];
        let s = scoring_prefix(&t);
        assert!(s.ends_with("### Response:\nNoise Items: \""));
        assert!(s.contains("User Interaction Sequence: \"Heat (1995)\", \"Alien (1979)\"\n"));
        let g = generation_prefix(&t, "Alien (1979)");
        assert!(g.starts_with(&s));
        assert!(g.ends_with("Alien (1979)\"\nSuggested Replacements: \""));
        let f = sft_text(&t, "Alien (1979)", "Heat (1995)");
        assert!(f.starts_with(&g) && f.ends_with("Heat (1995)\""));
    }
}
