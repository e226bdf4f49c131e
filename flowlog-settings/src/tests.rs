//! The mechanism on a small settings tree; each binary's config module tests
//! its own settings.

use std::{collections::BTreeMap, path::Path};

use clap::{CommandFactory, Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{parse_toml, reference, FileError, Flags};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The quick way.
    Fast,
    /// The careful way.
    TwoStep,
}
crate::value_enum!(Mode);

crate::settings! {
    /// Test top level.
    pub struct Top {
        /// A number.
        #[flag(long = "count", env = "FLOWLOG_SETTINGS_TEST_COUNT")]
        pub count: u32 = 7,
        /// A mode.
        #[flag(long = "mode", env = "FLOWLOG_SETTINGS_TEST_MODE")]
        pub mode: Mode = Mode::Fast,
        /// File only.
        pub labels: BTreeMap<String, String> = BTreeMap::new(),
        /// The nested part.
        pub inner: Inner = Inner::default(),
    }
}

crate::settings! {
    /// Test section.
    pub struct Inner {
        /// Unset by default.
        #[flag(long = "inner-name", env = "FLOWLOG_SETTINGS_TEST_NAME")]
        pub name: Option<String> = None,
        /// A list.
        #[flag(long = "inner-regions", env = "FLOWLOG_SETTINGS_TEST_REGIONS")]
        pub regions: Vec<String> = vec!["a".into()],
    }
}

#[derive(Debug, Parser)]
#[command(name = "test-bin", args_override_self = true)]
struct Cli {
    /// TOML settings file.
    #[arg(long, short, env = "FLOWLOG_SETTINGS_TEST_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Check and exit.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    flags: Flags<Top>,
}

fn parse(text: &str) -> Result<Top, FileError> {
    parse_toml(text, Path::new("t.toml"))
}

/// The setting a file error names, and its message.
fn invalid_key(text: &str) -> (String, String) {
    let e = parse(text).unwrap_err();
    (e.key().expect("an invalid file, not a read error").to_string(), e.to_string())
}

#[test]
fn file_over_defaults() {
    assert_eq!(parse("").unwrap(), Top::default());
    let t = parse("count = 3\n[inner]\nname = \"x\"\n").unwrap();
    assert_eq!((t.count, t.mode, t.inner.name.as_deref()), (3, Mode::Fast, Some("x")));
    assert_eq!(t.inner.regions, ["a"]);
    assert_eq!(parse("mode = \"two_step\"").unwrap().mode, Mode::TwoStep);
}

#[test]
fn file_errors_name_the_setting() {
    let (key, msg) = invalid_key("cuont = 3");
    assert_eq!(key, "cuont");
    assert!(msg.contains("t.toml") && msg.contains("unknown field `cuont`") && msg.contains("line 1"), "{msg}");
    let (key, msg) = invalid_key("count = 1\n[inner]\nnaem = \"x\"");
    assert_eq!(key, "inner.naem");
    assert!(msg.contains("line 3"), "{msg}");
    let (key, msg) = invalid_key("count = -1");
    assert_eq!(key, "count");
    assert!(msg.contains("count (line 1): invalid value"), "{msg}");
    let (key, msg) = invalid_key("mode = \"slow\"");
    assert_eq!(key, "mode");
    assert!(msg.contains("unknown variant `slow`"), "{msg}");
    assert_eq!(invalid_key("[labels]\nteam = 1").0, "labels.team");
    // Not TOML at all: no key, the parser's own position.
    let (key, msg) = invalid_key("count = ");
    assert_eq!(key, "");
    assert!(msg.contains("line 1"), "{msg}");
}

#[test]
fn flags_and_environment_over_file() {
    let mut t = parse("count = 3\nmode = \"two_step\"\n[inner]\nname = \"file\"").unwrap();
    let cli = Cli::parse_from(["x", "--count", "9", "--inner-regions", "b,c", "--inner-regions", "d"]);
    cli.flags.apply(&mut t);
    assert_eq!((t.count, t.mode, t.inner.name.as_deref()), (9, Mode::TwoStep, Some("file")));
    assert_eq!(t.inner.regions, ["b", "c", "d"]);
    assert_eq!(Cli::parse_from(["x", "--count", "1", "--count", "2"]).flags.matches.get_one::<u32>("count"), Some(&2));
    assert!(Cli::try_parse_from(["x", "--count", "many"]).is_err());
    assert!(Cli::try_parse_from(["x", "--mode", "two_step"]).is_err(), "flags use clap's kebab-case");

    // The environment beats the file, a flag beats the environment. The
    // variables are this test's own.
    std::env::set_var("FLOWLOG_SETTINGS_TEST_NAME", "env");
    std::env::set_var("FLOWLOG_SETTINGS_TEST_MODE", "two-step");
    std::env::set_var("FLOWLOG_SETTINGS_TEST_REGIONS", "e,f");
    let mut t = parse("[inner]\nname = \"file\"").unwrap();
    Cli::parse_from(["x"]).flags.apply(&mut t);
    assert_eq!((t.mode, t.inner.name.as_deref()), (Mode::TwoStep, Some("env")));
    assert_eq!(t.inner.regions, ["e", "f"]);
    Cli::parse_from(["x", "--inner-name", "flag", "--mode", "fast"]).flags.apply(&mut t);
    assert_eq!((t.mode, t.inner.name.as_deref()), (Mode::Fast, Some("flag")));
    for v in ["FLOWLOG_SETTINGS_TEST_NAME", "FLOWLOG_SETTINGS_TEST_MODE", "FLOWLOG_SETTINGS_TEST_REGIONS"] {
        std::env::remove_var(v);
    }
}

#[test]
fn reference_lists_every_setting() {
    Cli::command().debug_assert();
    let r = reference::<Top>(&Cli::command());
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(json["binary"], "test-bin");
    let keys: Vec<_> = r.settings.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["count", "mode", "labels", "inner.name", "inner.regions"]);
    assert!(r.undocumented().is_empty());
    assert_eq!(
        r.flag_names(),
        [
            "count --count FLOWLOG_SETTINGS_TEST_COUNT",
            "mode --mode FLOWLOG_SETTINGS_TEST_MODE",
            "inner.name --inner-name FLOWLOG_SETTINGS_TEST_NAME",
            "inner.regions --inner-regions FLOWLOG_SETTINGS_TEST_REGIONS",
        ]
    );
    let sections: Vec<_> = r.sections.iter().map(|s| (s.section.as_str(), s.doc.as_str())).collect();
    assert_eq!(sections, [("", ""), ("inner", "The nested part.")]);
    let s = &json["settings"];
    assert_eq!(s[0]["type"], "integer");
    assert_eq!(s[0]["default"], 7);
    assert_eq!(s[0]["flag"], "--count");
    assert_eq!(s[0]["env"], "FLOWLOG_SETTINGS_TEST_COUNT");
    assert_eq!(s[0]["doc"], "A number.");
    assert_eq!(s[1]["type"], "one of");
    assert_eq!(s[1]["default"], "fast");
    assert_eq!(s[1]["values"][1]["value"], "two_step");
    assert_eq!(s[1]["values"][1]["flag_value"], "two-step");
    assert_eq!(s[1]["values"][1]["doc"], "The careful way.");
    assert_eq!((&s[2]["type"], &s[2]["flag"], &s[2]["default"]), (&"table of strings".into(), &serde_json::Value::Null, &serde_json::json!({})));
    assert_eq!((&s[3]["section"], &s[3]["type"], &s[3]["default"]), (&"inner".into(), &"string".into(), &serde_json::Value::Null));
    assert_eq!((&s[4]["type"], &s[4]["flag_separator"]), (&"list of strings".into(), &",".into()));
    let cl: Vec<_> = r.command_line.iter().map(|a| (a.flag.as_str(), a.short.as_deref(), a.env.as_deref(), a.doc.as_str())).collect();
    assert_eq!(
        cl,
        [("--config", Some("-c"), Some("FLOWLOG_SETTINGS_TEST_CONFIG"), "TOML settings file."), ("--check", None, None, "Check and exit.")]
    );
    assert_eq!(r.command_line[1].default, None);
}
