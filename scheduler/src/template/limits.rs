//! Bounds on what a template may ask of a node, checked on the source before Liquid parses it
//! (Liquid's parser recurses per nested block, so a deep template would overflow the stack).
//!
//! - blocks nest at most [`MAX_DEPTH`] deep, loops at most [`MAX_LOOP_DEPTH`];
//! - an `if` or `case` has at most [`MAX_BRANCHES`] branches;
//! - a range has integer literal bounds and at most [`MAX_RANGE`] items, and nested literal
//!   ranges at most [`MAX_ITERATIONS`] together;
//! - a variable path has at most [`MAX_PATH`] segments.
//!
//! At render time, the filters that grow strings stop at [`MAX_STRING`] bytes and the
//! arithmetic filters fail on overflow instead of panicking; the output is bounded by the
//! caller.

/// Deepest nesting of blocks.
pub const MAX_DEPTH: usize = 32;
/// Deepest nesting of loops.
pub const MAX_LOOP_DEPTH: usize = 2;
/// Most `elsif`/`when` branches of one block.
pub const MAX_BRANCHES: usize = 100;
/// Most items of one range.
pub const MAX_RANGE: i64 = 10_000;
/// Most iterations of nested literal ranges together.
pub const MAX_ITERATIONS: i64 = 100_000;
/// Most segments of a variable path (`a.b.c` has 3).
pub const MAX_PATH: usize = 32;
/// Largest string a filter may build.
pub const MAX_STRING: usize = 1024 * 1024;

const BLOCKS: &[&str] =
    &["if", "unless", "for", "case", "capture", "tablerow", "comment", "raw", "ifchanged"];

/// Checks the bounds above; the error says which and where.
pub fn check(source: &str) -> Result<(), String> {
    for (open, close) in [("{{", "}}"), ("{%", "%}")] {
        let mut rest = source;
        while let Some(start) = rest.find(open) {
            let end = rest[start..].find(close).map_or(rest.len(), |e| start + e);
            check_paths(&rest[start + 2..end])?;
            rest = &rest[end.min(rest.len())..];
            if rest.len() <= 2 {
                break;
            }
            rest = &rest[2..];
        }
    }
    // (block, branches, iterations of this loop level)
    let mut open: Vec<(String, usize, i64)> = Vec::new();
    let mut rest = source;
    let mut offset = 0;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else { break };
        let tag =
            rest[start + 2..start + len].trim_matches(|c: char| c == '-' || c.is_whitespace());
        let at = offset + start;
        let name = tag.split(|c: char| c.is_whitespace() || c == '(').next().unwrap_or("");
        let in_raw = open.last().is_some_and(|(b, ..)| b == "raw" || b == "comment");
        if let Some(block) = name.strip_prefix("end") {
            if open.last().is_some_and(|(b, ..)| b == block) {
                open.pop();
            }
        } else if in_raw {
            // Nothing inside raw or comment is markup.
        } else if BLOCKS.contains(&name) {
            let mut iterations = 1;
            if name == "for" || name == "tablerow" {
                let loops = open.iter().filter(|(b, ..)| b == "for" || b == "tablerow").count();
                if loops >= MAX_LOOP_DEPTH {
                    return Err(format!(
                        "loops nest more than {MAX_LOOP_DEPTH} deep (at byte {at})"
                    ));
                }
                iterations = range_items(tag, at)?.unwrap_or(1);
                let outer: i64 = open.iter().map(|(.., n)| *n).product();
                if outer.saturating_mul(iterations) > MAX_ITERATIONS {
                    return Err(format!(
                        "nested ranges run more than {MAX_ITERATIONS} iterations (at byte {at})"
                    ));
                }
            }
            if open.len() >= MAX_DEPTH {
                return Err(format!("blocks nest more than {MAX_DEPTH} deep (at byte {at})"));
            }
            open.push((name.to_string(), 0, iterations));
        } else if matches!(name, "elsif" | "when") {
            if let Some(last) = open.last_mut() {
                last.1 += 1;
                if last.1 > MAX_BRANCHES {
                    return Err(format!(
                        "a block has more than {MAX_BRANCHES} elsif or when branches (at byte {at})"
                    ));
                }
            }
        } else if name == "assign" || name == "cycle" || name == "increment" {
            // A range outside a loop (`assign r = (1..n)`) is bounded the same way.
            range_items(tag, at)?;
        }
        offset += start + len + 2;
        rest = &rest[start + len + 2..];
    }
    Ok(())
}

/// Returns the items of the range in a tag, if it has one; an error for a range that is not
/// made of integer literals or is too long.
fn range_items(tag: &str, at: usize) -> Result<Option<i64>, String> {
    let Some(open) = tag.find('(') else { return Ok(None) };
    let Some(close) = tag[open..].find(')') else { return Ok(None) };
    let inner = &tag[open + 1..open + close];
    let Some((low, high)) = inner.split_once("..") else { return Ok(None) };
    let (Ok(low), Ok(high)) = (low.trim().parse::<i64>(), high.trim().parse::<i64>()) else {
        return Err(format!(
            "a range's bounds must be integer literals (at byte {at}); loop over an array instead"
        ));
    };
    let items = high.saturating_sub(low).saturating_add(1).max(0);
    if items > MAX_RANGE {
        return Err(format!("a range has more than {MAX_RANGE} items (at byte {at})"));
    }
    Ok(Some(items.max(1)))
}

/// Checks that no variable path has more than [`MAX_PATH`] segments.
fn check_paths(source: &str) -> Result<(), String> {
    let mut segments = 0;
    let mut in_word = false;
    for (i, c) in source.char_indices() {
        if c.is_alphanumeric() || c == '_' || c == '-' {
            if !in_word {
                in_word = true;
                segments += 1;
                if segments > MAX_PATH {
                    return Err(format!(
                        "a variable path has more than {MAX_PATH} segments (at byte {i})"
                    ));
                }
            }
        } else if c == '.' || c == '[' || c == ']' || c == '"' || c == '\'' {
            in_word = false;
        } else {
            in_word = false;
            segments = 0;
        }
    }
    Ok(())
}
