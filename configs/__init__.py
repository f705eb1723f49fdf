"""clipgen's stage configs, one `get_config(arg)` file per stage; installed as
`clipgen.configs` (clipgen.config.preset_path finds them either way)."""
