"""The training recipes. Each file's `get_config(variant)` returns an ml_collections
ConfigDict built from `cxrjax.config.base_config()` and ends with `with_variant`; its
docstring shows the command that runs it and its smoke variant. They ship inside the
package as `cxrjax.configs` (pyproject maps this folder there), so `--config chexnet`
works from any folder after `pip install cxrjax`, and `--config path/to/file.py` runs any
other file; `cxrjax.config` finds and loads them."""
