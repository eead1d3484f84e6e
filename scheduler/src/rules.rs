//! CEL expressions: segment filters, event filters and business rules.

/// Checks that `source` is a valid CEL expression; the error says where and why it is not.
pub fn check(source: &str) -> Result<(), String> {
    if source.len() > 8 * 1024 {
        return Err("must be at most 8 KiB".into());
    }
    cel::Program::compile(source).map(|_| ()).map_err(|errors| {
        errors
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_syntax_errors() {
        assert!(super::check("contact.attributes.plan == 'pro'").is_ok());
        assert!(!super::check("contact.attributes.plan ==").expect_err("incomplete").is_empty());
    }
}
