//! The static map as a source: the file the config names, reloaded when its
//! modification time changes. A bad file is rejected (counted and logged)
//! and the map in force stays; the map's age is exported.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tracing::{error, info};

use super::cidr::CidrMap;
use crate::metrics;

/// How often the file's modification time is checked.
const CHECK_EVERY: Duration = Duration::from_millis(200);

pub struct StaticMap {
    path: PathBuf,
    map: Arc<RwLock<CidrMap>>,
    /// The file's modification time when last read.
    mtime: Option<SystemTime>,
    /// Whether the map in force is what the file says.
    in_sync: bool,
    /// When the map in force last matched the file.
    synced_at: SystemTime,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl StaticMap {
    /// Loads `path` into `map`; a bad file is an error here (the enricher
    /// does not start without the map it was told to use).
    pub fn load(
        path: &Path,
        map: Arc<RwLock<CidrMap>>,
        now: SystemTime,
    ) -> anyhow::Result<StaticMap> {
        let mtime = mtime(path);
        let m = CidrMap::load(path).map_err(|e| anyhow::anyhow!("static map: {e}"))?;
        ::metrics::gauge!(metrics::STATIC_MAP_ENTRIES).set(m.entries as f64);
        *map.write().unwrap() = m;
        Ok(StaticMap {
            path: path.to_owned(),
            map,
            mtime,
            in_sync: true,
            synced_at: now,
        })
    }

    /// Reloads the file if it changed and returns the map's age: the time
    /// since the map in force last matched the file, so a rejected (or
    /// vanished) file shows up as a growing age.
    pub fn refresh(&mut self, now: SystemTime) -> Duration {
        let mtime = mtime(&self.path);
        if mtime != self.mtime {
            self.mtime = mtime;
            match CidrMap::load(&self.path) {
                Ok(m) => {
                    info!(entries = m.entries, "static map reloaded");
                    ::metrics::gauge!(metrics::STATIC_MAP_ENTRIES).set(m.entries as f64);
                    *self.map.write().unwrap() = m;
                    self.in_sync = true;
                }
                Err(e) => {
                    ::metrics::counter!(metrics::SOURCE_ERRORS, "source" => "static").increment(1);
                    error!("static map rejected, keeping the previous one: {e}");
                    self.in_sync = false;
                }
            }
        }
        if self.in_sync {
            self.synced_at = now;
        }
        let age = now.duration_since(self.synced_at).unwrap_or_default();
        ::metrics::gauge!(metrics::SOURCE_AGE, "source" => "static").set(age.as_secs_f64());
        age
    }
}

/// Loads the configured static map into `map` and keeps it current in the
/// background; without one, the map stays empty.
pub fn start(path: Option<&Path>, map: Arc<RwLock<CidrMap>>) -> anyhow::Result<()> {
    let Some(path) = path else {
        ::metrics::gauge!(metrics::STATIC_MAP_ENTRIES).set(0.0);
        return Ok(());
    };
    let mut watched = StaticMap::load(path, map, SystemTime::now())?;
    std::thread::Builder::new()
        .name("static-map".into())
        .spawn(move || loop {
            std::thread::sleep(CHECK_EVERY);
            watched.refresh(SystemTime::now());
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `text` and gives the file a modification time of its own
    /// (file systems with coarse timestamps would not see a quick rewrite).
    fn write(path: &Path, text: &str, mtime_secs: u64) {
        std::fs::write(path, text).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime_secs))
            .unwrap();
    }

    #[test]
    fn reloads_on_change_and_keeps_the_old_map_on_a_bad_file() {
        let path =
            std::env::temp_dir().join(format!("flowlog-static-map-{}.toml", std::process::id()));
        let entry = |cidr: &str| format!("[[entry]]\ncidr = \"{cidr}\"\nworkload = \"w\"\n");
        write(&path, &entry("10.0.0.0/8"), 1_000);
        let map = Arc::new(RwLock::new(CidrMap::default()));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut s = StaticMap::load(&path, map.clone(), t0).unwrap();
        let owned = |ip: &str| map.read().unwrap().lookup(ip.parse().unwrap()).is_some();
        assert!(owned("10.1.1.1"));
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(s.refresh(at(5)), Duration::ZERO);

        // Changed: reloaded.
        write(
            &path,
            &format!("{}{}", entry("10.0.0.0/8"), entry("192.168.0.0/16")),
            2_000,
        );
        assert_eq!(s.refresh(at(10)), Duration::ZERO);
        assert_eq!(map.read().unwrap().entries, 2);
        assert!(owned("192.168.1.1"));

        // A bad file: the map in force stays, and its age grows from the
        // last time it matched the file.
        write(&path, "[[entry]]\ncidr = \"nope\"\n", 3_000);
        assert_eq!(s.refresh(at(20)), Duration::from_secs(10));
        assert_eq!(s.refresh(at(30)), Duration::from_secs(20));
        assert!(owned("192.168.1.1"));

        // Vanished: the same.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.refresh(at(40)), Duration::from_secs(30));
        assert!(owned("192.168.1.1"));

        // Fixed: in force again, age back to zero.
        write(&path, &entry("172.16.0.0/12"), 4_000);
        assert_eq!(s.refresh(at(50)), Duration::ZERO);
        assert!(owned("172.16.0.1") && !owned("192.168.1.1"));
        std::fs::remove_file(&path).unwrap();
    }
}
