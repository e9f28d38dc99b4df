//! Importers: source files in, a [`RawLog`](crate::interactions::RawLog) (or, for the
//! reference CSV windows, ready-made windows) out. Each importer checks what it reads and names
//! the file, the line or row, and the field when something is wrong.
//!
//! - [`recbole`]: RecBole atomic files (`.inter` + `.item`, tab-separated, typed headers),
//!   including ML-1M's CRLF line ends, `1m_` user prefixes and title-as-id items.
//! - [`parquet`]: generic Parquet logs and catalogues with configurable column names.
//! - [`movie_csv`]: the LLM4DSR reference repository's window CSVs (Python-literal lists,
//!   HTML-escaped titles, masks 1 and 2).

pub mod movie_csv;
pub mod parquet;
pub mod recbole;

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Read a whole file, naming it when it is missing or unreadable.
pub fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    if !path.exists() {
        bail!("{}: {what} file not found", path.display());
    }
    std::fs::read(path).with_context(|| format!("{}: cannot read {what} file", path.display()))
}

/// Check `bytes` is UTF-8; otherwise name the line and (for delimited files) the field by its
/// header name.
pub fn check_utf8<'a>(
    path: &Path,
    bytes: &'a [u8],
    delimiter: u8,
    field_names: &[String],
) -> Result<&'a str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => {
            let at = e.valid_up_to();
            let line_start = bytes[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            let col = bytes[line_start..at]
                .iter()
                .filter(|&&b| b == delimiter)
                .count();
            let field = field_names
                .get(col)
                .map(|s| format!("field `{s}`"))
                .unwrap_or_else(|| format!("column {}", col + 1));
            bail!(
                "{}: line {line}, {field}: text is not valid UTF-8 (byte offset {at})",
                path.display()
            )
        }
    }
}

/// Parse a timestamp written as an integer or a float (RecBole writes `:float`).
#[inline]
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(v) = s.parse::<i64>() {
        return Some(v);
    }
    float_timestamp(s.parse::<f64>().ok()?)
}

/// A float timestamp as an integer (fraction dropped); `None` when not finite or beyond what
/// an `i64` holds with room to spare (|f| >= 9e18), rather than saturating.
#[inline]
pub fn float_timestamp(f: f64) -> Option<i64> {
    (f.is_finite() && f.abs() < 9.0e18).then_some(f as i64)
}

/// Decode the HTML character references the reference data uses: numeric ones (`&#39;`,
/// `&#xHH;`), the XML five (`&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`) and HTML 4's named
/// entities of Latin-1 and general punctuation (`&eacute;`, `&nbsp;`, `&ndash;`, `&rsquo;`,
/// ...). Unknown references stay as written.
pub fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        // A byte search: slicing the str at byte 12 could split a multi-byte character.
        let Some(end) = rest.as_bytes()[..rest.len().min(12)]
            .iter()
            .position(|&b| b == b';')
        else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let name = &rest[1..end];
        let decoded = match name {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ if name.starts_with("#x") || name.starts_with("#X") => {
                u32::from_str_radix(&name[2..], 16)
                    .ok()
                    .and_then(char::from_u32)
            }
            _ if name.starts_with('#') => name[1..].parse::<u32>().ok().and_then(char::from_u32),
            _ => LATIN1_ENTITIES
                .iter()
                .position(|&e| e == name)
                .and_then(|k| char::from_u32(0xa0 + k as u32))
                .or_else(|| OTHER_ENTITIES.iter().find(|e| e.0 == name).map(|e| e.1)),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// HTML 4's named entities of Latin-1 (U+00A0..=U+00FF, in code point order).
const LATIN1_ENTITIES: [&str; 96] = [
    "nbsp", "iexcl", "cent", "pound", "curren", "yen", "brvbar", "sect", "uml", "copy", "ordf",
    "laquo", "not", "shy", "reg", "macr", "deg", "plusmn", "sup2", "sup3", "acute", "micro",
    "para", "middot", "cedil", "sup1", "ordm", "raquo", "frac14", "frac12", "frac34", "iquest",
    "Agrave", "Aacute", "Acirc", "Atilde", "Auml", "Aring", "AElig", "Ccedil", "Egrave", "Eacute",
    "Ecirc", "Euml", "Igrave", "Iacute", "Icirc", "Iuml", "ETH", "Ntilde", "Ograve", "Oacute",
    "Ocirc", "Otilde", "Ouml", "times", "Oslash", "Ugrave", "Uacute", "Ucirc", "Uuml", "Yacute",
    "THORN", "szlig", "agrave", "aacute", "acirc", "atilde", "auml", "aring", "aelig", "ccedil",
    "egrave", "eacute", "ecirc", "euml", "igrave", "iacute", "icirc", "iuml", "eth", "ntilde",
    "ograve", "oacute", "ocirc", "otilde", "ouml", "divide", "oslash", "ugrave", "uacute", "ucirc",
    "uuml", "yacute", "thorn", "yuml",
];

/// HTML 4's other named entities that occur in titles: Latin Extended letters and the
/// general punctuation (dashes, curly quotes, ellipsis, ...).
const OTHER_ENTITIES: [(&str, char); 30] = [
    ("OElig", '\u{152}'),
    ("oelig", '\u{153}'),
    ("Scaron", '\u{160}'),
    ("scaron", '\u{161}'),
    ("Yuml", '\u{178}'),
    ("fnof", '\u{192}'),
    ("circ", '\u{2c6}'),
    ("tilde", '\u{2dc}'),
    ("ensp", '\u{2002}'),
    ("emsp", '\u{2003}'),
    ("thinsp", '\u{2009}'),
    ("ndash", '\u{2013}'),
    ("mdash", '\u{2014}'),
    ("lsquo", '\u{2018}'),
    ("rsquo", '\u{2019}'),
    ("sbquo", '\u{201a}'),
    ("ldquo", '\u{201c}'),
    ("rdquo", '\u{201d}'),
    ("bdquo", '\u{201e}'),
    ("dagger", '\u{2020}'),
    ("Dagger", '\u{2021}'),
    ("bull", '\u{2022}'),
    ("hellip", '\u{2026}'),
    ("permil", '\u{2030}'),
    ("prime", '\u{2032}'),
    ("Prime", '\u{2033}'),
    ("lsaquo", '\u{2039}'),
    ("rsaquo", '\u{203a}'),
    ("euro", '\u{20ac}'),
    ("trade", '\u{2122}'),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_html() {
        assert_eq!(html_unescape("Law &amp; Order"), "Law & Order");
        assert_eq!(html_unescape("a &#39;b&#x27; &quot;c&quot;"), "a 'b' \"c\"");
        // Named entities beyond the XML five (the Movie catalogue has 15 titles with them).
        assert_eq!(html_unescape("Pep&eacute; Le Pew"), "Pepé Le Pew");
        assert_eq!(
            html_unescape("&Eacute;t&eacute; &ndash; &lsquo;x&rsquo; &nbsp;&yuml;&iexcl;&hellip;"),
            "Été – ‘x’ \u{a0}ÿ¡…"
        );
        // Unknown names and stray ampersands stay as they are; a multi-byte character within
        // 12 bytes of an `&` is no place to cut.
        assert_eq!(html_unescape("R&amp;B &bogus; A & B"), "R&B &bogus; A & B");
        assert_eq!(html_unescape("&1234567890é;"), "&1234567890é;");
        assert_eq!(html_unescape("AT&T &bogus; &"), "AT&T &bogus; &");
    }

    #[test]
    fn timestamps_int_or_float() {
        assert_eq!(parse_timestamp("881250949"), Some(881250949));
        assert_eq!(parse_timestamp("881250949.0"), Some(881250949));
        assert_eq!(parse_timestamp("abc"), None);
        assert_eq!(parse_timestamp("nan"), None);
    }

    #[test]
    fn utf8_error_names_line_and_field() {
        let names = vec!["user_id".to_string(), "item_id".to_string()];
        let e = check_utf8(Path::new("x.inter"), b"a\tb\n1\t\xff\n", b'\t', &names)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.inter: line 2, field `item_id`"), "{e}");
    }
}
