//! The [`Registry`]: the plugins a binary runs, built-in and the embedding binary's own, checked
//! for valid, unique names as they are added. Running them (slots, tasks, admin operations) is
//! `runner.rs`; the plugin contract itself is the `quire-projection-api` crate.

use std::sync::Arc;

use quire_projection_api::Plugin;

/// The plugins a node runs. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    plugins: Vec<Arc<dyn Plugin>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.plugins.iter().map(|p| p.name().to_string()))
            .finish()
    }
}

impl Registry {
    /// The projectors built into quire: `kv` (the key/value table of each stream), `sql` (each
    /// stream's records in SQLite tables) and `files` (each stream's file tree).
    pub fn builtin() -> Registry {
        Registry::default()
            .with(quire_projection_kv::Kv)
            .with(quire_projection_sql::Sql)
            .with(quire_projection_files::Files)
    }

    /// Adds `plugin`.
    ///
    /// # Panics
    /// If its name is not `[a-z0-9-]{1,64}` or is already taken: a programming error of the
    /// binary that registers it, caught the first time it starts.
    pub fn with(mut self, plugin: impl Plugin) -> Registry {
        let name = plugin.name();
        assert!(
            valid_name(name),
            "projector name {name:?} must be 1-64 characters of a-z, 0-9 and -"
        );
        assert!(
            self.get(name).is_none(),
            "two projectors are named {name:?}"
        );
        self.plugins.push(Arc::new(plugin));
        self
    }

    /// The plugin named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Plugin>> {
        self.plugins.iter().find(|plugin| plugin.name() == name)
    }

    /// Every plugin, in registration order.
    pub fn plugins(&self) -> &[Arc<dyn Plugin>] {
        &self.plugins
    }

    /// Every plugin's name, in registration order.
    pub(super) fn names(&self) -> Vec<String> {
        self.plugins.iter().map(|p| p.name().to_string()).collect()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
