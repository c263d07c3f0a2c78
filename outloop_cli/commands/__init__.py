"""One module per command group: parse flags, call the core, print. No business logic lives here."""
