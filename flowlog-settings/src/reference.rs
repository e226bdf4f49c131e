//! The configuration reference a binary prints with `--print-config-reference`:
//! every setting with its section, file key, type, default, flag,
//! environment variable and meaning, and the command-line-only arguments.
//! docs/configuration.md and deploy/check are built from it.

use std::collections::BTreeMap;

use clap::{ArgAction, Command, ValueEnum};
use serde::Serialize;

use crate::{doc_text, FlagInfo, Setting};

#[derive(Debug, Serialize)]
pub struct Reference {
    /// The binary (clap's command name).
    pub binary: String,
    /// Arguments that are not settings (`--config`, `--log`, ...).
    pub command_line: Vec<CommandLineArg>,
    /// Sections in file order; `""` is the top level.
    pub sections: Vec<SectionDoc>,
    pub settings: Vec<SettingDoc>,
    /// What a binary adds about itself (the sidecar: the Kafka properties it refuses).
    #[serde(flatten)]
    pub extra: BTreeMap<&'static str, serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct CommandLineArg {
    pub flag: String,
    pub short: Option<String>,
    pub env: Option<String>,
    pub default: Option<String>,
    pub doc: String,
}

#[derive(Debug, Serialize)]
pub struct SectionDoc {
    pub section: String,
    pub doc: String,
}

#[derive(Debug, Serialize)]
pub struct SettingDoc {
    /// `""` for the top level.
    pub section: String,
    /// The dotted name: `kafka.brokers` is key `brokers` in table `[kafka]`.
    pub key: String,
    #[serde(rename = "type")]
    pub type_name: String,
    /// The values of a "one of" setting.
    pub values: Vec<EnumValue>,
    /// As JSON; `null` for unset.
    pub default: serde_json::Value,
    pub flag: Option<String>,
    /// Separates several values in one flag or variable (lists).
    pub flag_separator: Option<char>,
    pub env: Option<String>,
    pub doc: String,
}

/// One value of an enum setting.
#[derive(Debug, Serialize)]
pub struct EnumValue {
    /// As written in the file.
    pub value: String,
    /// As written in a flag or environment variable (clap's kebab-case).
    pub flag_value: String,
    pub doc: String,
}

impl EnumValue {
    /// Every value of `T`, named by serde (file) and clap (flags), with its doc comment.
    pub fn all<T: ValueEnum + Serialize>() -> Vec<EnumValue> {
        T::value_variants()
            .iter()
            .filter_map(|v| {
                let pv = v.to_possible_value()?;
                let value = match serde_json::to_value(v) {
                    Ok(serde_json::Value::String(s)) => s,
                    _ => pv.get_name().to_string(),
                };
                let doc = sentence(pv.get_help().map(|h| h.to_string()).unwrap_or_default());
                Some(EnumValue { value, flag_value: pv.get_name().to_string(), doc })
            })
            .collect()
    }
}

/// The reference of the settings `C` (defaults from `C::default()`) and of
/// the other arguments of `cmd`, the binary's clap command.
pub fn reference<C: Setting + Default>(cmd: &Command) -> Reference {
    let mut r = Reference {
        binary: cmd.get_name().to_string(),
        command_line: Vec::new(),
        sections: Vec::new(),
        settings: Vec::new(),
        extra: BTreeMap::new(),
    };
    C::default().describe("", "", None, &mut r);
    for a in cmd.get_arguments() {
        let Some(long) = a.get_long() else { continue };
        let flag = format!("--{long}");
        if matches!(long, "help" | "version") || r.settings.iter().any(|s| s.flag.as_ref() == Some(&flag)) {
            continue;
        }
        let help = a.get_long_help().or(a.get_help()).map(|h| h.to_string()).unwrap_or_default();
        let switch = matches!(a.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        r.command_line.push(CommandLineArg {
            flag,
            short: a.get_short().map(|c| format!("-{c}")),
            env: a.get_env().map(|e| e.to_string_lossy().into_owned()),
            default: a.get_default_values().first().filter(|_| !switch).map(|v| v.to_string_lossy().into_owned()),
            doc: sentence(doc_text(&help.lines().collect::<Vec<_>>())),
        });
    }
    r
}

/// clap drops the full stop of a one-sentence doc comment; the reference keeps it.
fn sentence(mut doc: String) -> String {
    if !doc.is_empty() && !doc.ends_with(['.', '!', '?']) {
        doc.push('.');
    }
    doc
}

impl Reference {
    pub fn add_section(&mut self, key: &str, doc: &str) {
        self.sections.push(SectionDoc { section: key.to_string(), doc: doc.to_string() });
    }

    pub fn add_setting<T: Setting>(&mut self, key: &str, doc: &str, flag: Option<FlagInfo>, default: &T) {
        self.settings.push(SettingDoc {
            section: key.rsplit_once('.').map(|(s, _)| s).unwrap_or("").to_string(),
            key: key.to_string(),
            type_name: T::type_name(),
            values: T::values(),
            default: serde_json::to_value(default).unwrap_or(serde_json::Value::Null),
            flag: flag.map(|f| format!("--{}", f.long)),
            flag_separator: flag.and_then(|f| f.separator),
            env: flag.map(|f| f.env.to_string()),
            doc: doc.to_string(),
        });
    }

    /// `key --flag ENV` of every setting that has a flag: the names scripts
    /// and deployments use.
    pub fn flag_names(&self) -> Vec<String> {
        let named = self.settings.iter().filter_map(|s| Some((s, s.flag.as_ref()?, s.env.as_ref()?)));
        named.map(|(s, flag, env)| format!("{} {flag} {env}", s.key)).collect()
    }

    /// The flags of the command-line-only arguments (`--config`, ...).
    pub fn command_line_flags(&self) -> Vec<&str> {
        self.command_line.iter().map(|a| a.flag.as_str()).collect()
    }

    /// Settings without a doc comment (each must say what it does).
    pub fn undocumented(&self) -> Vec<&str> {
        self.settings.iter().filter(|s| s.doc.is_empty()).map(|s| s.key.as_str()).collect()
    }

    /// Adds what a binary says about itself (see `extra`).
    pub fn insert(&mut self, key: &'static str, value: impl Serialize) {
        self.extra.insert(key, serde_json::to_value(value).expect("the reference is plain data"));
    }

    /// Pretty JSON, as `--print-config-reference` prints it.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the reference is plain data")
    }
}
