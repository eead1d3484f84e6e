//! The README's sections and shell blocks, for the tests that run its commands as written.

/// Returns the README's section that starts with `heading` (a `## ` line), without the heading,
/// up to the next `## ` heading.
pub fn section(heading: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let start = readme.find(heading).unwrap_or_else(|| panic!("README has no {heading:?}"));
    let section = &readme[start + heading.len()..];
    section[..section.find("\n## ").unwrap_or(section.len())].to_string()
}

/// Returns the `sh` blocks of that section, in order.
pub fn sh_blocks(heading: &str) -> Vec<String> {
    section(heading)
        .split("```sh\n")
        .skip(1)
        .map(|rest| rest[..rest.find("```").unwrap_or(rest.len())].to_string())
        .collect()
}
