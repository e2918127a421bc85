"""The built-in plugins, installed as ``toolkit.plugins``: each module registers its parts through the
same hooks as any third-party plugin (:mod:`toolkit.hookspecs`), and the plugin manager loads every
module of this package."""
