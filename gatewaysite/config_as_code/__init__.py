"""Configuration as code: a YAML file applied idempotently, exported, imported from LiteLLM.

- `loader`: YAML with exact decimals and no duplicate keys.
- `schema`: the file's format, validated into specs (every error with its path).
- `state`: what the database holds now, by natural keys.
- `plan`: the differences between the two, and applying them through the services.
- `export`: the running configuration as the same YAML.
- `litellm`: a LiteLLM proxy `config.yaml` translated into that YAML.

See docs/config-as-code.md.
"""
