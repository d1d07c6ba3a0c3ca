"""storage: database models, migrations, the spool and queue claiming."""
