//! Filters and a block that replace Liquid's standard ones where those could take a node
//! down: the string and array builders stop at [`MAX_STRING`](super::limits::MAX_STRING), the
//! arithmetic fails on overflow (Liquid's `divided_by` panics on `i64::MIN / -1`), and
//! `capture` stops at the same size.

use std::io::Write;

use liquid_core::error::ResultLiquidExt;
use liquid_core::model::{KString, Value, ValueView};
use liquid_core::{
    BlockReflection, Display_filter, Error, Expression, Filter, FilterParameters, FilterReflection,
    FromFilterParameters, Language, ParseBlock, ParseFilter, Renderable, Result, Runtime, TagBlock,
    TagTokenIter, Template,
};

use super::limits::MAX_STRING;

fn too_long(what: &str) -> Error {
    Error::with_msg(format!("{what}: the result would be longer than {MAX_STRING} bytes"))
}

fn number_expected(what: &str) -> Error {
    Error::with_msg(format!("{what}: number expected"))
}

#[derive(Debug, FilterParameters)]
struct TextArg {
    #[parameter(description = "The text.", arg_type = "str")]
    text: Expression,
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(name = "append", description = "Appends text.", parameters(TextArg), parsed(AppendFilter))]
pub(crate) struct Append;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "append"]
struct AppendFilter {
    #[parameters]
    args: TextArg,
}

impl Filter for AppendFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        let args = self.args.evaluate(runtime)?;
        let (input, text) = (input.to_kstr(), args.text);
        if input.len() + text.len() > MAX_STRING {
            return Err(too_long("append"));
        }
        Ok(Value::scalar(format!("{input}{text}")))
    }
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "prepend",
    description = "Prepends text.",
    parameters(TextArg),
    parsed(PrependFilter)
)]
pub(crate) struct Prepend;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "prepend"]
struct PrependFilter {
    #[parameters]
    args: TextArg,
}

impl Filter for PrependFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        let args = self.args.evaluate(runtime)?;
        let (input, text) = (input.to_kstr(), args.text);
        if input.len() + text.len() > MAX_STRING {
            return Err(too_long("prepend"));
        }
        Ok(Value::scalar(format!("{text}{input}")))
    }
}

#[derive(Debug, FilterParameters)]
struct ReplaceArgs {
    #[parameter(description = "The text to find.", arg_type = "str")]
    search: Expression,
    #[parameter(description = "The text to put instead.", arg_type = "str")]
    replace: Option<Expression>,
}

/// The length `input` would have with `count` occurrences of `search` replaced.
fn replaced_len(input: &str, search: &str, replace: &str, count: usize) -> usize {
    let hits = if search.is_empty() { input.len() + 1 } else { input.matches(search).count() };
    let hits = hits.min(count);
    (input.len() + hits.saturating_mul(replace.len())).saturating_sub(hits * search.len())
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "replace",
    description = "Replaces every occurrence of a text.",
    parameters(ReplaceArgs),
    parsed(ReplaceFilter)
)]
pub(crate) struct Replace;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "replace"]
struct ReplaceFilter {
    #[parameters]
    args: ReplaceArgs,
}

impl Filter for ReplaceFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        let args = self.args.evaluate(runtime)?;
        let input = input.to_kstr();
        let replace = args.replace.unwrap_or_default();
        if replaced_len(&input, &args.search, &replace, usize::MAX) > MAX_STRING {
            return Err(too_long("replace"));
        }
        Ok(Value::scalar(input.replace(args.search.as_str(), replace.as_str())))
    }
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "replace_first",
    description = "Replaces the first occurrence of a text.",
    parameters(ReplaceArgs),
    parsed(ReplaceFirstFilter)
)]
pub(crate) struct ReplaceFirst;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "replace_first"]
struct ReplaceFirstFilter {
    #[parameters]
    args: ReplaceArgs,
}

impl Filter for ReplaceFirstFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        let args = self.args.evaluate(runtime)?;
        let input = input.to_kstr();
        let replace = args.replace.unwrap_or_default();
        if replaced_len(&input, &args.search, &replace, 1) > MAX_STRING {
            return Err(too_long("replace_first"));
        }
        Ok(Value::scalar(input.replacen(args.search.as_str(), replace.as_str(), 1)))
    }
}

#[derive(Debug, FilterParameters)]
struct ArrayArg {
    #[parameter(description = "The array to add.")]
    array: Expression,
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "concat",
    description = "Joins two arrays.",
    parameters(ArrayArg),
    parsed(ConcatFilter)
)]
pub(crate) struct Concat;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "concat"]
struct ConcatFilter {
    #[parameters]
    args: ArrayArg,
}

/// Most items of an array built by `concat`.
const MAX_ITEMS: usize = 100_000;

impl Filter for ConcatFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        let args = self.args.evaluate(runtime)?;
        let input = input.as_array().ok_or_else(|| Error::with_msg("concat: array expected"))?;
        let more =
            args.array.as_array().ok_or_else(|| Error::with_msg("concat: array expected"))?;
        if input.size() as usize + more.size() as usize > MAX_ITEMS {
            return Err(Error::with_msg(format!("concat: more than {MAX_ITEMS} items")));
        }
        Ok(Value::array(input.values().chain(more.values()).map(|v| v.to_value())))
    }
}

#[derive(Debug, FilterParameters)]
struct OperandArg {
    #[parameter(description = "The operand.")]
    operand: Expression,
}

type IntOp = fn(i64, i64) -> std::result::Result<Option<i64>, &'static str>;
type FloatOp = fn(f64, f64) -> std::result::Result<f64, &'static str>;

/// Applies an arithmetic filter: checked on integers, plain on floats.
fn arithmetic(
    name: &str,
    input: &dyn ValueView,
    operand: &dyn ValueView,
    int: IntOp,
    float: FloatOp,
) -> Result<Value> {
    let input = input.as_scalar().ok_or_else(|| number_expected(name))?;
    let operand = operand.as_scalar().ok_or_else(|| number_expected(name))?;
    if let (Some(a), Some(b)) = (input.to_integer(), operand.to_integer()) {
        return match int(a, b) {
            Ok(Some(n)) => Ok(Value::scalar(n)),
            Ok(None) => Err(Error::with_msg(format!("{name}: integer overflow"))),
            Err(reason) => Err(Error::with_msg(format!("{name}: {reason}"))),
        };
    }
    match (input.to_float(), operand.to_float()) {
        (Some(a), Some(b)) => float(a, b)
            .map(Value::scalar)
            .map_err(|reason| Error::with_msg(format!("{name}: {reason}"))),
        _ => Err(number_expected(name)),
    }
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(name = "plus", description = "Adds a number.", parameters(OperandArg), parsed(PlusFilter))]
pub(crate) struct Plus;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "plus"]
struct PlusFilter {
    #[parameters]
    args: OperandArg,
}

impl Filter for PlusFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        let args = self.args.evaluate(runtime)?;
        arithmetic(
            "plus",
            input,
            args.operand.as_view(),
            |a, b| Ok(a.checked_add(b)),
            |a, b| Ok(a + b),
        )
    }
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "minus",
    description = "Subtracts a number.",
    parameters(OperandArg),
    parsed(MinusFilter)
)]
pub(crate) struct Minus;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "minus"]
struct MinusFilter {
    #[parameters]
    args: OperandArg,
}

impl Filter for MinusFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        let args = self.args.evaluate(runtime)?;
        arithmetic(
            "minus",
            input,
            args.operand.as_view(),
            |a, b| Ok(a.checked_sub(b)),
            |a, b| Ok(a - b),
        )
    }
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "times",
    description = "Multiplies by a number.",
    parameters(OperandArg),
    parsed(TimesFilter)
)]
pub(crate) struct Times;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "times"]
struct TimesFilter {
    #[parameters]
    args: OperandArg,
}

impl Filter for TimesFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        let args = self.args.evaluate(runtime)?;
        arithmetic(
            "times",
            input,
            args.operand.as_view(),
            |a, b| Ok(a.checked_mul(b)),
            |a, b| Ok(a * b),
        )
    }
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "divided_by",
    description = "Divides by a number.",
    parameters(OperandArg),
    parsed(DividedByFilter)
)]
pub(crate) struct DividedBy;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "divided_by"]
struct DividedByFilter {
    #[parameters]
    args: OperandArg,
}

impl Filter for DividedByFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        let args = self.args.evaluate(runtime)?;
        arithmetic(
            "divided_by",
            input,
            args.operand.as_view(),
            |a, b| if b == 0 { Err("cannot divide by zero") } else { Ok(a.checked_div(b)) },
            |a, b| if b == 0.0 { Err("cannot divide by zero") } else { Ok(a / b) },
        )
    }
}

#[derive(Clone, ParseFilter, FilterReflection)]
#[filter(
    name = "modulo",
    description = "The remainder of a division.",
    parameters(OperandArg),
    parsed(ModuloFilter)
)]
pub(crate) struct Modulo;

#[derive(Debug, FromFilterParameters, Display_filter)]
#[name = "modulo"]
struct ModuloFilter {
    #[parameters]
    args: OperandArg,
}

impl Filter for ModuloFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> Result<Value> {
        let args = self.args.evaluate(runtime)?;
        arithmetic(
            "modulo",
            input,
            args.operand.as_view(),
            |a, b| if b == 0 { Err("cannot divide by zero") } else { Ok(a.checked_rem(b)) },
            |a, b| if b == 0.0 { Err("cannot divide by zero") } else { Ok(a % b) },
        )
    }
}

/// `{% capture name %}…{% endcapture %}`, stopping at [`MAX_STRING`] bytes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CaptureBlock;

impl BlockReflection for CaptureBlock {
    fn start_tag(&self) -> &str {
        "capture"
    }

    fn end_tag(&self) -> &str {
        "endcapture"
    }

    fn description(&self) -> &str {
        "Renders its body into a variable."
    }
}

impl ParseBlock for CaptureBlock {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        mut tokens: TagBlock<'_, '_>,
        options: &Language,
    ) -> Result<Box<dyn Renderable>> {
        let id: KString = arguments
            .expect_next("Identifier expected")?
            .expect_identifier()
            .into_result()?
            .to_owned()
            .into();
        arguments.expect_nothing()?;
        let template = Template::new(
            tokens.parse_all(options).trace_with(|| format!("{{% capture {id} %}}").into())?,
        );
        tokens.assert_empty();
        Ok(Box::new(Capture { id, template }))
    }

    fn reflection(&self) -> &dyn BlockReflection {
        self
    }
}

#[derive(Debug)]
struct Capture {
    id: KString,
    template: Template,
}

/// A buffer that refuses to grow past [`MAX_STRING`].
struct Bounded {
    out: Vec<u8>,
    full: bool,
}

impl Write for Bounded {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + bytes.len() > MAX_STRING {
            self.full = true;
            return Err(std::io::Error::other("capture: too long"));
        }
        self.out.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Renderable for Capture {
    fn render_to(&self, _writer: &mut dyn Write, runtime: &dyn Runtime) -> Result<()> {
        let mut captured = Bounded { out: Vec::new(), full: false };
        let rendered = self.template.render_to(&mut captured, runtime);
        if captured.full {
            return Err(too_long("capture"));
        }
        rendered.trace_with(|| format!("{{% capture {} %}}", self.id).into())?;
        let output = String::from_utf8_lossy(&captured.out).into_owned();
        runtime.set_global(self.id.clone(), Value::scalar(output));
        Ok(())
    }
}
