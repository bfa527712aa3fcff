"""One thin module per subcommand: options in, one call into ``llmctl.core``, output out."""
