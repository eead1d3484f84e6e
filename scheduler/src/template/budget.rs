//! A time budget for one render. Every tag, block and filter of the language is wrapped so
//! that it checks the budget before it runs, and so does the output writer: a render that
//! runs past [`MAX_RENDER_TIME`] stops at its next step, wherever it is (in the body of a loop
//! over a large list, in a filter called a hundred thousand times).

use std::cell::Cell;
use std::io::Write;
use std::time::{Duration, Instant};

use liquid_core::parser::{FilterArguments, ParseFilter, ParseTag};
use liquid_core::{
    BlockReflection, Error, Filter, FilterReflection, Language, ParseBlock, Renderable, Result,
    Runtime, TagBlock, TagReflection, TagTokenIter, Value, ValueView,
};

/// Longest one template may take to render.
pub const MAX_RENDER_TIME: Duration = Duration::from_secs(1);

thread_local! {
    /// When the render running on this thread must stop; none outside a render.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Set when a step found the deadline passed.
    static EXPIRED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `render` with the budget; `Err(())` when it ran out (whatever `render` returned).
pub(crate) fn within<R>(render: impl FnOnce() -> R) -> std::result::Result<R, ()> {
    DEADLINE.with(|deadline| deadline.set(Some(Instant::now() + MAX_RENDER_TIME)));
    EXPIRED.with(|expired| expired.set(false));
    let result = render();
    DEADLINE.with(|deadline| deadline.set(None));
    if EXPIRED.with(Cell::take) { Err(()) } else { Ok(result) }
}

/// Fails once the budget of the render running on this thread has run out.
pub(crate) fn on_time() -> Result<()> {
    let late = DEADLINE.with(|deadline| deadline.get().is_some_and(|at| Instant::now() >= at));
    if late {
        EXPIRED.with(|expired| expired.set(true));
        return Err(Error::with_msg(format!(
            "took longer than {} ms to render",
            MAX_RENDER_TIME.as_millis()
        )));
    }
    Ok(())
}

/// A writer that checks the budget on every write.
pub(crate) struct Timed<W>(pub W);

impl<W: Write> Write for Timed<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        on_time().map_err(|e| std::io::Error::other(e.to_string()))?;
        self.0.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A tag that checks the budget before it runs.
#[derive(Clone)]
pub(crate) struct TimedTag(pub Box<dyn ParseTag>);

impl ParseTag for TimedTag {
    fn parse(
        &self,
        arguments: TagTokenIter<'_>,
        options: &Language,
    ) -> Result<Box<dyn Renderable>> {
        Ok(Box::new(Step(self.0.parse(arguments, options)?)))
    }

    fn reflection(&self) -> &dyn TagReflection {
        self.0.reflection()
    }
}

/// A block that checks the budget before it runs (its body's tags check it at every step).
#[derive(Clone)]
pub(crate) struct TimedBlock(pub Box<dyn ParseBlock>);

impl ParseBlock for TimedBlock {
    fn parse(
        &self,
        arguments: TagTokenIter<'_>,
        block: TagBlock<'_, '_>,
        options: &Language,
    ) -> Result<Box<dyn Renderable>> {
        Ok(Box::new(Step(self.0.parse(arguments, block, options)?)))
    }

    fn reflection(&self) -> &dyn BlockReflection {
        self.0.reflection()
    }
}

#[derive(Debug)]
struct Step(Box<dyn Renderable>);

impl Renderable for Step {
    fn render_to(&self, writer: &mut dyn Write, runtime: &dyn Runtime) -> Result<()> {
        on_time()?;
        self.0.render_to(writer, runtime)
    }
}

/// A filter that checks the budget before it runs.
#[derive(Clone)]
pub(crate) struct TimedFilter(pub Box<dyn ParseFilter>);

impl ParseFilter for TimedFilter {
    fn parse(&self, arguments: FilterArguments<'_>) -> Result<Box<dyn Filter>> {
        Ok(Box::new(FilterStep(self.0.parse(arguments)?)))
    }

    fn reflection(&self) -> &dyn FilterReflection {
        self.0.reflection()
    }
}

#[derive(Debug)]
struct FilterStep(Box<dyn Filter>);

impl std::fmt::Display for FilterStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Filter for FilterStep {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        on_time()?;
        self.0.evaluate(input, runtime)
    }
}
