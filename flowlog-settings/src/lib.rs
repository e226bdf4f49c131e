//! Each setting of a binary declared once.
//!
//! [`settings!`] declares one section of a settings file: every field with
//! its doc comment, type, default and, where it has them, its command-line
//! flag and environment variable. From that one declaration come
//! - the serde struct the TOML file is read into (unknown keys refused),
//! - its `Default`,
//! - the clap flags, each also read from its environment variable,
//! - the configuration reference (`--print-config-reference`, [`reference`]),
//!   which `scripts/gen-docs.py` turns into docs/configuration.md.
//!
//! Precedence: defaults < file ([`read_file`]) < environment < flags
//! ([`Flags::apply`]; clap lets a flag beat its environment variable).
//!
//! ```
//! flowlog_settings::settings! {
//!     /// The top level of the file.
//!     pub struct Config {
//!         /// Prometheus endpoint; empty disables it.
//!         #[flag(long = "metrics-listen", env = "APP_METRICS_LISTEN")]
//!         pub metrics_listen: String = "127.0.0.1:9464".into(),
//!         /// Only in the file: no flag attribute.
//!         pub linger_ms: u32 = 50,
//!     }
//! }
//! ```
//!
//! A field whose type is itself a `settings!` struct is a `[section]` of the
//! file; its flags join the binary's flags.

mod file;
mod reference;

use std::{collections::BTreeMap, marker::PhantomData, path::PathBuf};

pub use clap;
use clap::{Arg, ArgAction, ArgMatches, Command};
pub use file::{load, parse_toml, read_file, FileError, TempFile};
pub use reference::{reference, EnumValue, Reference};
use serde::Serialize;

/// What every setting's type provides: its name in the reference and, for a
/// section, its fields' flags. Implemented here for the plain types, by
/// [`settings!`] for sections and by [`value_enum!`] for enums.
pub trait Setting: Serialize + Sized {
    /// How the reference names the type: "integer", "path", "section", ...
    fn type_name() -> String;
    /// The values of an enum ("one of"); empty for other types.
    fn values() -> Vec<EnumValue> {
        Vec::new()
    }
    /// A section adds its fields' flags; a plain value has none of its own.
    fn add_flags(cmd: Command) -> Command {
        cmd
    }
    /// A section takes its fields' flag values; a plain value is set by its parent.
    fn apply_flags(&mut self, _m: &ArgMatches) {}
    /// Adds this setting (with `self` as its default) to the reference.
    fn describe(&self, key: &str, doc: &str, flag: Option<FlagInfo>, out: &mut Reference) {
        out.add_setting::<Self>(key, doc, flag, self);
    }
}

/// A type that can be given as a flag value (and environment variable).
pub trait Flag: Sized {
    /// Separates several values in one flag or variable (lists only).
    const SEPARATOR: Option<char> = None;
    /// `arg` with this type's value parser.
    fn arg(arg: Arg) -> Arg;
    /// The value given on the command line or in the environment, if any.
    fn get(m: &ArgMatches, id: &str) -> Option<Self>;
}

/// A setting's flag, as the reference lists it.
#[derive(Debug, Clone, Copy)]
pub struct FlagInfo {
    pub long: &'static str,
    pub env: &'static str,
    pub separator: Option<char>,
}

impl FlagInfo {
    pub fn new<T: Flag>(long: &'static str, env: &'static str) -> FlagInfo {
        FlagInfo { long, env, separator: T::SEPARATOR }
    }
}

macro_rules! plain {
    ($($t:ty => $name:literal),* $(,)?) => {$(
        impl Setting for $t {
            fn type_name() -> String {
                $name.into()
            }
        }
        impl Flag for $t {
            fn arg(arg: Arg) -> Arg {
                arg.value_parser(clap::value_parser!($t))
            }
            fn get(m: &ArgMatches, id: &str) -> Option<Self> {
                m.get_one::<$t>(id).cloned()
            }
        }
    )*};
}

plain!(bool => "boolean", u16 => "integer", u32 => "integer", u64 => "integer", usize => "integer", i32 => "integer",
    String => "string", PathBuf => "path");

/// Unset by default; a flag sets it.
impl<T: Setting> Setting for Option<T> {
    fn type_name() -> String {
        T::type_name()
    }
    fn values() -> Vec<EnumValue> {
        T::values()
    }
}

impl<T: Flag> Flag for Option<T> {
    const SEPARATOR: Option<char> = T::SEPARATOR;
    fn arg(arg: Arg) -> Arg {
        T::arg(arg)
    }
    fn get(m: &ArgMatches, id: &str) -> Option<Self> {
        T::get(m, id).map(Some)
    }
}

impl<T: Setting> Setting for Vec<T> {
    fn type_name() -> String {
        format!("list of {}s", T::type_name())
    }
}

/// A list flag: comma separated (`--regions a,b`), or the flag repeated.
impl<T: Flag + Clone + Send + Sync + 'static> Flag for Vec<T> {
    const SEPARATOR: Option<char> = Some(',');
    fn arg(arg: Arg) -> Arg {
        T::arg(arg).value_delimiter(',').action(ArgAction::Append)
    }
    fn get(m: &ArgMatches, id: &str) -> Option<Self> {
        m.get_many::<T>(id).map(|v| v.cloned().collect())
    }
}

/// A free-form table (file only).
impl<T: Setting> Setting for BTreeMap<String, T> {
    fn type_name() -> String {
        format!("table of {}s", T::type_name())
    }
}

/// The arguments every flowlog binary has besides `--config` and `--log`:
/// `#[command(flatten)] pub common: Common<Config>`.
#[derive(Debug, Clone, clap::Args)]
pub struct Common<C: Setting + Send + Sync + 'static> {
    /// Check the configuration (file, environment, flags, and the files it
    /// names) and exit: 0 when it is valid, 1 with the reason when not.
    /// Touches neither the kernel nor Kafka.
    #[arg(long)]
    pub check_config: bool,
    /// Print every setting (file key, type, default, flag, environment
    /// variable, meaning) and every exported metric as JSON and exit.
    #[arg(long)]
    pub print_config_reference: bool,
    /// Every setting's flag (and environment variable).
    #[command(flatten)]
    pub flags: Flags<C>,
}

/// The flags of every setting of `C` (a [`settings!`] struct), for a clap
/// `Parser` struct: `#[command(flatten)] pub flags: Flags<Config>`.
#[derive(Debug, Clone)]
pub struct Flags<C> {
    matches: ArgMatches,
    settings: PhantomData<C>,
}

impl<C: Setting> Flags<C> {
    /// Overrides what the file (or the default) set with what the flags and
    /// the environment give.
    pub fn apply(&self, config: &mut C) {
        config.apply_flags(&self.matches);
    }
}

impl<C: Setting> clap::Args for Flags<C> {
    fn augment_args(cmd: Command) -> Command {
        C::add_flags(cmd)
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        C::add_flags(cmd)
    }
}

impl<C> clap::FromArgMatches for Flags<C> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Flags { matches: m.clone(), settings: PhantomData })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.matches = m.clone();
        Ok(())
    }
}

/// The clap argument of one setting (used by [`settings!`]): the long flag
/// is its id, the doc comment its help.
pub fn flag_arg(long: &'static str, env: &'static str, doc: &[&str]) -> Arg {
    Arg::new(long)
        .long(long)
        .env(env)
        .value_name(long.to_uppercase().replace('-', "_"))
        // Without the full stop, like the help clap derives from doc comments.
        .help(doc_text(doc).trim_end_matches('.').to_string())
}

/// Doc comment lines as one line of text.
pub fn doc_text(lines: &[&str]) -> String {
    lines.iter().map(|l| l.trim()).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// `section.field`, or `field` at the top level.
pub fn join_key(section: &str, field: &str) -> String {
    if section.is_empty() {
        field.to_string()
    } else {
        format!("{section}.{field}")
    }
}

/// Declares one section of a settings file; see the crate docs.
///
/// Each field: its doc comment (the reference's meaning, the flag's help),
/// optionally `#[flag(long = "...", env = "...")]`, then
/// `pub name: Type = default,`. Field types implement [`Setting`] (and
/// [`Flag`] when they have a flag).
#[macro_export]
macro_rules! settings {
    (
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $(#[flag(long = $long:literal, env = $env:literal)])?
                pub $field:ident: $ty:ty = $default:expr,
            )*
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, ::serde::Deserialize, ::serde::Serialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $field: $default, )* }
            }
        }

        impl $crate::Setting for $name {
            fn type_name() -> String {
                "section".into()
            }
            fn add_flags(mut cmd: $crate::clap::Command) -> $crate::clap::Command {
                $(
                    cmd = $crate::__add_flag!(cmd, $ty, [$($doc),*] $(, $long, $env)?);
                    cmd = <$ty as $crate::Setting>::add_flags(cmd);
                )*
                cmd
            }
            fn apply_flags(&mut self, m: &$crate::clap::ArgMatches) {
                $(
                    $( if let Some(v) = <$ty as $crate::Flag>::get(m, $long) { self.$field = v; } )?
                    $crate::Setting::apply_flags(&mut self.$field, m);
                )*
            }
            fn describe(&self, key: &str, doc: &str, _: Option<$crate::FlagInfo>, out: &mut $crate::Reference) {
                out.add_section(key, doc);
                $(
                    $crate::Setting::describe(
                        &self.$field,
                        &$crate::join_key(key, stringify!($field)),
                        &$crate::doc_text(&[$($doc),*]),
                        $crate::__flag_info!($ty $(, $long, $env)?),
                        out,
                    );
                )*
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __add_flag {
    ($cmd:ident, $ty:ty, [$($doc:literal),*]) => {
        $cmd
    };
    ($cmd:ident, $ty:ty, [$($doc:literal),*], $long:literal, $env:literal) => {
        $cmd.arg(<$ty as $crate::Flag>::arg($crate::flag_arg($long, $env, &[$($doc),*])))
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __flag_info {
    ($ty:ty) => {
        None
    };
    ($ty:ty, $long:literal, $env:literal) => {
        Some($crate::FlagInfo::new::<$ty>($long, $env))
    };
}

/// Makes enums (deriving serde and `clap::ValueEnum`) settings: "one of"
/// their values, each with its doc comment.
#[macro_export]
macro_rules! value_enum {
    ($($t:ty),* $(,)?) => {$(
        impl $crate::Setting for $t {
            fn type_name() -> String {
                "one of".into()
            }
            fn values() -> Vec<$crate::EnumValue> {
                $crate::EnumValue::all::<$t>()
            }
        }
        impl $crate::Flag for $t {
            fn arg(arg: $crate::clap::Arg) -> $crate::clap::Arg {
                arg.value_parser($crate::clap::builder::EnumValueParser::<$t>::new())
            }
            fn get(m: &$crate::clap::ArgMatches, id: &str) -> Option<Self> {
                m.get_one::<$t>(id).cloned()
            }
        }
    )*};
}

#[cfg(test)]
mod tests;
