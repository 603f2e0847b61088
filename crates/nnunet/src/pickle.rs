//! A minimal, non-executing pickle reader: it runs the opcodes of protocols 2 to 5 that
//! Python's `pickle` writes for dicts, lists, tuples, sets, numbers, strings, bytes and numpy
//! objects, and builds a symbolic value model. Globals, `REDUCE`, `NEWOBJ` and `BUILD` are kept
//! as data (never called); [`numpy_array`] and [`numpy_scalar`] then recognise numpy's own
//! reductions (`_reconstruct` + state, `_frombuffer`, `scalar`, `dtype`). Anything else is an
//! error naming the file, the byte offset and the opcode.

use std::path::Path;
use std::rc::Rc;

use crate::NnunetError;
use crate::array::{NdArray, NpyDType};

/// Nesting limit for values (guards recursion on hostile input).
const MAX_DEPTH: usize = 64;

/// Index of a mutable object in the [`Pickle`] arena.
pub type ObjId = usize;

/// A value on the pickle stack.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits `i64`.
    Int(i64),
    /// A float.
    Float(f64),
    /// A `str`.
    Str(Rc<str>),
    /// `bytes` or `bytearray`.
    Bytes(Rc<[u8]>),
    /// A tuple.
    Tuple(Rc<[Value]>),
    /// A mutable object (list, dict, set, global, reduction) in the arena.
    Obj(ObjId),
}

/// A mutable object.
#[derive(Clone, Debug, PartialEq)]
pub enum Obj {
    /// A list.
    List(Vec<Value>),
    /// A dict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A set or frozenset.
    Set(Vec<Value>),
    /// A global reference `module.name` (never imported).
    Global {
        /// Module.
        module: String,
        /// Name.
        name: String,
    },
    /// `callable(*args)` kept symbolic, with the state a later `BUILD` gave it.
    Reduce {
        /// The callable (usually a [`Obj::Global`]).
        callable: Value,
        /// The argument tuple.
        args: Value,
        /// `BUILD` state.
        state: Option<Value>,
    },
}

/// A decoded pickle: the arena and the root value.
#[derive(Clone, Debug)]
pub struct Pickle {
    /// Every mutable object.
    pub objs: Vec<Obj>,
    /// The unpickled value.
    pub root: Value,
}

impl Pickle {
    /// The object behind a value, when it is one.
    pub fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.objs.get(*i),
            _ => None,
        }
    }

    /// The entries of a dict value.
    pub fn dict<'a>(&'a self, v: &Value) -> Option<&'a [(Value, Value)]> {
        match self.obj(v)? {
            Obj::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// The value stored under the string key `key` of a dict value.
    pub fn get<'a>(&'a self, dict: &Value, key: &str) -> Option<&'a Value> {
        self.dict(dict)?
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
            .map(|(_, v)| v)
    }

    /// The items of a list or tuple value.
    pub fn seq<'a>(&'a self, v: &'a Value) -> Option<&'a [Value]> {
        match v {
            Value::Tuple(t) => Some(t),
            Value::Obj(i) => match self.objs.get(*i)? {
                Obj::List(l) => Some(l),
                _ => None,
            },
            _ => None,
        }
    }

    /// `module.name` of a global value.
    pub fn global_name(&self, v: &Value) -> Option<String> {
        match self.obj(v)? {
            Obj::Global { module, name } => Some(format!("{module}.{name}")),
            _ => None,
        }
    }

    /// A number as `f64`: Python int/float/bool or a numpy scalar.
    pub fn number(&self, v: &Value) -> Option<f64> {
        match v {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => numpy_scalar(self, v).ok().flatten(),
        }
    }

    /// An integer: Python int/bool or an integer numpy scalar.
    pub fn integer(&self, v: &Value) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => {
                let f = numpy_scalar(self, v).ok().flatten()?;
                (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
            }
        }
    }
}

/// Pickle opcode names, for errors.
fn opname(op: u8) -> String {
    let name = match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return format!("{op:#04x}"),
    };
    name.to_string()
}

/// Reads and decodes a `.pkl` file.
pub fn read_pickle(path: &Path) -> Result<Pickle, NnunetError> {
    let bytes = std::fs::read(path).map_err(|e| NnunetError::io(path, e))?;
    parse_pickle(path, &bytes)
}

/// Decodes pickle bytes (`path` names them in errors).
pub fn parse_pickle(path: &Path, data: &[u8]) -> Result<Pickle, NnunetError> {
    let mut vm = Vm {
        path,
        data,
        pos: 0,
        op_at: 0,
        op: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: std::collections::HashMap::new(),
        objs: Vec::new(),
    };
    let root = vm.run()?;
    Ok(Pickle {
        objs: vm.objs,
        root,
    })
}

struct Vm<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    op_at: usize,
    op: u8,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u64, Value>,
    objs: Vec<Obj>,
}

impl Vm<'_> {
    fn err(&self, reason: impl Into<String>) -> NnunetError {
        NnunetError::Pickle {
            path: self.path.to_path_buf(),
            offset: self.op_at,
            opcode: opname(self.op),
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], NnunetError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| self.err(format!("needs {n} bytes, the pickle ends first")))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, NnunetError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, NnunetError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, NnunetError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, NnunetError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn len64(&mut self) -> Result<usize, NnunetError> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.err(format!("length {n} too large")))
    }

    fn pop(&mut self) -> Result<Value, NnunetError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.err("pops past a MARK"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack is empty"))
    }

    fn top(&mut self) -> Result<&mut Value, NnunetError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack is empty"));
        }
        let n = self.stack.len();
        Ok(&mut self.stack[n - 1])
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, NnunetError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.err("MARK above the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn new_obj(&mut self, o: Obj) -> Value {
        self.objs.push(o);
        Value::Obj(self.objs.len() - 1)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn string(&mut self, n: usize) -> Result<Value, NnunetError> {
        let b = self.take(n)?.to_vec();
        match String::from_utf8(b) {
            Ok(s) => Ok(Value::Str(s.into())),
            Err(_) => Err(self.err("string is not UTF-8")),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<Value, NnunetError> {
        let b: Rc<[u8]> = self.take(n)?.into();
        Ok(Value::Bytes(b))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), NnunetError> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), NnunetError> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.err(format!("memo key {key} was never stored")))?;
        self.push(v);
        Ok(())
    }

    fn long(&mut self, n: usize) -> Result<Value, NnunetError> {
        let b = self.take(n)?.to_vec();
        if b.is_empty() {
            return Ok(Value::Int(0));
        }
        if b.len() > 8 {
            // Allow sign-extension bytes beyond 8.
            let sign = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
            if b[8..].iter().any(|&x| x != sign) {
                return Err(self.err("integer does not fit 64 bits"));
            }
        }
        let mut v = [if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 }; 8];
        for (i, &x) in b.iter().take(8).enumerate() {
            v[i] = x;
        }
        Ok(Value::Int(i64::from_le_bytes(v)))
    }

    /// Applies `f` to the list, dict, set or object on top of the stack (which stays there).
    fn mutate_top(
        &mut self,
        f: impl FnOnce(&mut Obj) -> Result<(), String>,
    ) -> Result<(), NnunetError> {
        let target = self.top()?.clone();
        let Value::Obj(i) = &target else {
            return Err(self.err(format!("target {target:?} is not a list, dict or set")));
        };
        let i = *i;
        let r = f(&mut self.objs[i]);
        r.map_err(|e| self.err(e))
    }

    /// Runs opcodes until `STOP` and returns the value it pops.
    fn run(&mut self) -> Result<Value, NnunetError> {
        loop {
            self.op_at = self.pos;
            self.op = 0;
            let op = self.u8()?;
            self.op = op;
            if op == b'.' {
                return self.pop();
            }
            let known = self.stack_op(op)?
                || self.number_op(op)?
                || self.text_op(op)?
                || self.container_op(op)?
                || self.fill_op(op)?
                || self.object_op(op)?;
            if !known {
                return Err(self.err("opcode not supported by this reader"));
            }
            if self.stack.len() > 1_000_000 {
                return Err(self.err("stack deeper than 1,000,000 values"));
            }
        }
    }

    /// Framing, marks, stack shuffling and the memo; `false` when `op` is not one of them.
    fn stack_op(&mut self, op: u8) -> Result<bool, NnunetError> {
        match op {
            0x80 => {
                let v = self.u8()?;
                if !(2..=5).contains(&v) {
                    return Err(self.err(format!("protocol {v} (only 2 to 5)")));
                }
            }
            0x95 => {
                self.u64()?;
            }
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v);
            }
            0x94 => {
                let key = self.memo.len() as u64;
                self.memo_put(key)?;
            }
            b'q' => {
                let key = u64::from(self.u8()?);
                self.memo_put(key)?;
            }
            b'r' => {
                let key = u64::from(self.u32()?);
                self.memo_put(key)?;
            }
            b'h' => {
                let key = u64::from(self.u8()?);
                self.memo_get(key)?;
            }
            b'j' => {
                let key = u64::from(self.u32()?);
                self.memo_get(key)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `None`, booleans, integers and floats; `false` when `op` is not one of them.
    fn number_op(&mut self, op: u8) -> Result<bool, NnunetError> {
        let v = match op {
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'J' => Value::Int(i64::from(self.u32()? as i32)),
            b'K' => Value::Int(i64::from(self.u8()?)),
            b'M' => Value::Int(i64::from(self.u16()?)),
            0x8a => {
                let n = usize::from(self.u8()?);
                self.long(n)?
            }
            0x8b => {
                let n = self.u32()? as usize;
                self.long(n)?
            }
            b'G' => {
                let b = self.take(8)?;
                Value::Float(f64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
            }
            _ => return Ok(false),
        };
        self.push(v);
        Ok(true)
    }

    /// Strings and bytes (Python 2 `str` read as bytes); `false` when `op` is not one of them.
    fn text_op(&mut self, op: u8) -> Result<bool, NnunetError> {
        let v = match op {
            0x8c => {
                let n = usize::from(self.u8()?);
                self.string(n)?
            }
            b'X' => {
                let n = self.u32()? as usize;
                self.string(n)?
            }
            0x8d => {
                let n = self.len64()?;
                self.string(n)?
            }
            // SHORT_BINBYTES, and SHORT_BINSTRING: a Python 2 str is bytes.
            b'C' | b'U' => {
                let n = usize::from(self.u8()?);
                self.bytes(n)?
            }
            // BINBYTES, and BINSTRING: a Python 2 str is bytes.
            b'B' | b'T' => {
                let n = self.u32()? as usize;
                self.bytes(n)?
            }
            0x8e | 0x96 => {
                let n = self.len64()?;
                self.bytes(n)?
            }
            _ => return Ok(false),
        };
        self.push(v);
        Ok(true)
    }

    /// New tuples, lists, dicts and sets; `false` when `op` is not one of them.
    fn container_op(&mut self, op: u8) -> Result<bool, NnunetError> {
        let v = match op {
            b')' => Value::Tuple(Rc::from(Vec::new())),
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                Value::Tuple(items.into())
            }
            b't' => Value::Tuple(self.pop_mark()?.into()),
            b']' => self.new_obj(Obj::List(Vec::new())),
            b'l' => {
                let items = self.pop_mark()?;
                self.new_obj(Obj::List(items))
            }
            b'}' => self.new_obj(Obj::Dict(Vec::new())),
            b'd' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err(self.err("odd number of items for a dict"));
                }
                let pairs = items
                    .chunks_exact(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect();
                self.new_obj(Obj::Dict(pairs))
            }
            0x8f => self.new_obj(Obj::Set(Vec::new())),
            0x91 => {
                let items = self.pop_mark()?;
                self.new_obj(Obj::Set(items))
            }
            _ => return Ok(false),
        };
        self.push(v);
        Ok(true)
    }

    /// Items added to the list, set or dict on the stack; `false` when `op` is not one of them.
    fn fill_op(&mut self, op: u8) -> Result<bool, NnunetError> {
        match op {
            b'a' => {
                let v = self.pop()?;
                self.mutate_top(|o| match o {
                    Obj::List(l) => {
                        l.push(v);
                        Ok(())
                    }
                    _ => Err("APPEND to something that is not a list".into()),
                })?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.mutate_top(|o| match o {
                    Obj::List(l) => {
                        l.extend(items);
                        Ok(())
                    }
                    _ => Err("APPENDS to something that is not a list".into()),
                })?;
            }
            0x90 => {
                let items = self.pop_mark()?;
                self.mutate_top(|o| match o {
                    Obj::Set(s) => {
                        s.extend(items);
                        Ok(())
                    }
                    _ => Err("ADDITEMS to something that is not a set".into()),
                })?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.mutate_top(|o| match o {
                    Obj::Dict(d) => {
                        set_item(d, k, v);
                        Ok(())
                    }
                    _ => Err("SETITEM on something that is not a dict".into()),
                })?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err(self.err("odd number of items for SETITEMS"));
                }
                self.mutate_top(|o| match o {
                    Obj::Dict(d) => {
                        for p in items.chunks_exact(2) {
                            set_item(d, p[0].clone(), p[1].clone());
                        }
                        Ok(())
                    }
                    _ => Err("SETITEMS on something that is not a dict".into()),
                })?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Globals, reductions and `BUILD`, all kept symbolic; `false` when `op` is not one of them.
    fn object_op(&mut self, op: u8) -> Result<bool, NnunetError> {
        match op {
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let v = self.new_obj(Obj::Global { module, name });
                self.push(v);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (module, name) else {
                    return Err(self.err("module and name must be strings"));
                };
                let v = self.new_obj(Obj::Global {
                    module: module.to_string(),
                    name: name.to_string(),
                });
                self.push(v);
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = self.new_obj(Obj::Reduce {
                    callable,
                    args,
                    state: None,
                });
                self.push(v);
            }
            0x92 => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let callable = self.pop()?;
                let empty = matches!(&kwargs, Value::Obj(i) if matches!(&self.objs[*i], Obj::Dict(d) if d.is_empty()));
                if !empty {
                    return Err(self.err("keyword arguments are not supported"));
                }
                let v = self.new_obj(Obj::Reduce {
                    callable,
                    args,
                    state: None,
                });
                self.push(v);
            }
            b'b' => {
                let state = self.pop()?;
                self.mutate_top(|o| match o {
                    Obj::Reduce { state: s, .. } => {
                        *s = Some(state);
                        Ok(())
                    }
                    _ => Err("BUILD on something that is not a constructed object".into()),
                })?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn line(&mut self) -> Result<String, NnunetError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("line without a newline"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
}

/// Dict assignment keeps the last value of a key (keys compared by value for scalars).
fn set_item(d: &mut Vec<(Value, Value)>, k: Value, v: Value) {
    let scalar = matches!(
        k,
        Value::Int(_) | Value::Str(_) | Value::Bool(_) | Value::None
    );
    if scalar && let Some(slot) = d.iter_mut().find(|(kk, _)| *kk == k) {
        slot.1 = v;
        return;
    }
    d.push((k, v));
}

/// The bytes of a value: `bytes`/`bytearray`, or how protocol 2 writes Python 3 bytes
/// (`_codecs.encode(text, 'latin1')`, `builtins.bytes()`, `builtins.bytearray(...)`).
pub fn bytes_of(p: &Pickle, v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Bytes(b) => Some(b.to_vec()),
        _ => {
            let Some(Obj::Reduce { callable, args, .. }) = p.obj(v) else {
                return None;
            };
            let name = p.global_name(callable)?;
            let args = p.seq(args)?;
            match (name.as_str(), args) {
                ("_codecs.encode", [Value::Str(s), Value::Str(enc)])
                    if enc.eq_ignore_ascii_case("latin1")
                        || enc.eq_ignore_ascii_case("latin-1") =>
                {
                    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect()
                }
                ("builtins.bytes" | "__builtin__.bytes" | "builtins.bytearray", []) => {
                    Some(Vec::new())
                }
                ("builtins.bytearray" | "__builtin__.bytearray", [b]) => bytes_of(p, b),
                _ => None,
            }
        }
    }
}

fn is_numpy(name: &str, tail: &str) -> bool {
    [
        format!("numpy.core.multiarray.{tail}"),
        format!("numpy._core.multiarray.{tail}"),
        format!("numpy.core.numeric.{tail}"),
        format!("numpy._core.numeric.{tail}"),
    ]
    .iter()
    .any(|n| n == name)
}

/// A pickled `numpy.dtype`: `numpy.dtype(descr, align, copy)` with state `(version, byteorder,
/// ...)`.
fn numpy_dtype(p: &Pickle, v: &Value) -> Result<NpyDType, String> {
    let Some(Obj::Reduce {
        callable,
        args,
        state,
    }) = p.obj(v)
    else {
        return Err(format!("dtype is {v:?}, not a numpy.dtype reduction"));
    };
    if p.global_name(callable).as_deref() != Some("numpy.dtype") {
        return Err(format!(
            "dtype made by {:?}, not numpy.dtype",
            p.global_name(callable)
        ));
    }
    let descr = match p.seq(args).and_then(|a| a.first()) {
        Some(Value::Str(s)) => s.to_string(),
        other => {
            return Err(format!(
                "numpy.dtype argument {other:?} is not a type string"
            ));
        }
    };
    let order = state
        .as_ref()
        .and_then(|s| p.seq(s))
        .and_then(|s| s.get(1))
        .and_then(|o| match o {
            Value::Str(s) => Some(s.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "<".into());
    let full = if descr.starts_with(['<', '>', '|', '=']) {
        descr.clone()
    } else {
        format!("{order}{descr}")
    };
    NpyDType::parse(&full)
        .ok_or_else(|| format!("numpy dtype {descr:?} (only booleans, integers and floats)"))
}

/// Interprets a value as a numpy array (`ndarray` pickled by numpy ≥ 1.x with protocols 2–5).
/// `Ok(None)` when the value is not a numpy array at all.
pub fn numpy_array(p: &Pickle, v: &Value, path: &Path) -> Result<Option<NdArray>, NnunetError> {
    let Some(Obj::Reduce {
        callable,
        args,
        state,
    }) = p.obj(v)
    else {
        return Ok(None);
    };
    let name = p.global_name(callable).unwrap_or_default();
    let bad = |r: String| NnunetError::format(path, format!("numpy array in the pickle: {r}"));
    if is_numpy(&name, "_reconstruct") {
        let Some(state) = state else {
            return Err(bad("ndarray without state".into()));
        };
        let s = p
            .seq(state)
            .ok_or_else(|| bad("state is not a tuple".into()))?;
        if s.len() != 5 {
            return Err(bad(format!("state has {} fields, 5 expected", s.len())));
        }
        let shape = shape_of(p, &s[1]).ok_or_else(|| bad(format!("shape {:?}", s[1])))?;
        let dtype = numpy_dtype(p, &s[2]).map_err(bad)?;
        let fortran = matches!(s[3], Value::Bool(true));
        let Some(raw) = bytes_of(p, &s[4]) else {
            return Err(NnunetError::unsupported(
                path,
                "numpy array of Python objects in the pickle",
            ));
        };
        return NdArray::from_raw(path, dtype, shape, raw, fortran).map(Some);
    }
    if is_numpy(&name, "_frombuffer") {
        let a = p
            .seq(args)
            .ok_or_else(|| bad("_frombuffer arguments".into()))?;
        if a.len() != 4 {
            return Err(bad(format!(
                "_frombuffer with {} arguments, 4 expected",
                a.len()
            )));
        }
        let Some(raw) = bytes_of(p, &a[0]) else {
            return Err(bad(
                "_frombuffer buffer is not bytes (out-of-band buffers are not supported)".into(),
            ));
        };
        let dtype = numpy_dtype(p, &a[1]).map_err(bad)?;
        let shape = shape_of(p, &a[2]).ok_or_else(|| bad(format!("shape {:?}", a[2])))?;
        let fortran = matches!(&a[3], Value::Str(s) if &**s == "F");
        return NdArray::from_raw(path, dtype, shape, raw, fortran).map(Some);
    }
    Ok(None)
}

/// Interprets a value as a numpy scalar (`numpy.core.multiarray.scalar(dtype, bytes)`);
/// `Ok(None)` when it is not one.
pub fn numpy_scalar(p: &Pickle, v: &Value) -> Result<Option<f64>, String> {
    let Some(Obj::Reduce { callable, args, .. }) = p.obj(v) else {
        return Ok(None);
    };
    if !is_numpy(&p.global_name(callable).unwrap_or_default(), "scalar") {
        return Ok(None);
    }
    let a = p.seq(args).ok_or("scalar arguments are not a tuple")?;
    let (Some(dt), Some(raw)) = (a.first(), a.get(1).and_then(|b| bytes_of(p, b))) else {
        return Err("scalar arguments are not (dtype, bytes)".into());
    };
    let dtype = numpy_dtype(p, dt)?;
    let arr =
        NdArray::from_raw(Path::new(""), dtype, vec![], raw, false).map_err(|e| e.to_string())?;
    Ok(Some(arr.get_f64(0)))
}

fn shape_of(p: &Pickle, v: &Value) -> Option<Vec<usize>> {
    p.seq(v)?
        .iter()
        .map(|d| p.integer(d).and_then(|i| usize::try_from(i).ok()))
        .collect()
}

/// A value as JSON, for reports and tests: dicts become objects (keys as strings), numpy arrays
/// and scalars numbers or nested lists; other objects their `module.name`.
pub fn to_json(p: &Pickle, v: &Value) -> serde_json::Value {
    to_json_depth(p, v, 0)
}

fn to_json_depth(p: &Pickle, v: &Value, depth: usize) -> serde_json::Value {
    use serde_json::Value as J;
    if depth > MAX_DEPTH {
        return J::Null;
    }
    match v {
        Value::None => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Str(s) => J::String(s.to_string()),
        Value::Bytes(b) => J::Array(b.iter().map(|&x| J::from(x)).collect()),
        Value::Tuple(t) => J::Array(t.iter().map(|x| to_json_depth(p, x, depth + 1)).collect()),
        Value::Obj(i) => match &p.objs[*i] {
            Obj::List(l) | Obj::Set(l) => {
                J::Array(l.iter().map(|x| to_json_depth(p, x, depth + 1)).collect())
            }
            Obj::Dict(d) => J::Object(
                d.iter()
                    .map(|(k, x)| {
                        let key = match k {
                            Value::Str(s) => s.to_string(),
                            other => to_json_depth(p, other, depth + 1).to_string(),
                        };
                        (key, to_json_depth(p, x, depth + 1))
                    })
                    .collect(),
            ),
            Obj::Global { module, name } => J::String(format!("{module}.{name}")),
            Obj::Reduce { .. } => {
                if let Ok(Some(a)) = numpy_array(p, v, Path::new("")) {
                    array_json(&a)
                } else if let Ok(Some(x)) = numpy_scalar(p, v) {
                    serde_json::Number::from_f64(x).map_or(J::Null, J::Number)
                } else {
                    J::String(format!("<object {}>", opaque_name(p, v)))
                }
            }
        },
    }
}

fn opaque_name(p: &Pickle, v: &Value) -> String {
    match p.obj(v) {
        Some(Obj::Reduce { callable, .. }) => p.global_name(callable).unwrap_or_default(),
        _ => String::new(),
    }
}

fn array_json(a: &NdArray) -> serde_json::Value {
    use serde_json::Value as J;
    fn rec(a: &NdArray, dim: usize, base: usize) -> J {
        if dim == a.shape.len() {
            let x = a.get_f64(base);
            return if a.dtype.kind == crate::array::ElemKind::Float {
                serde_json::Number::from_f64(x).map_or(J::Null, J::Number)
            } else {
                J::from(x as i64)
            };
        }
        let stride: usize = a.shape[dim + 1..].iter().product();
        J::Array(
            (0..a.shape[dim])
                .map(|i| rec(a, dim + 1, base + i * stride))
                .collect(),
        )
    }
    rec(a, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dicts_lists_tuples_and_memo_sharing() {
        // pickle.dumps({'a': [1, 2], 'b': (1.5, None, True), 'c': b'xy'}, protocol=2) by hand:
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend([
            b'X', 1, 0, 0, 0, b'a', b'q', 1, b']', b'q', 2, b'(', b'K', 1, b'K', 2, b'e',
        ]);
        p.extend([b'X', 1, 0, 0, 0, b'b', b'q', 3, b'G']);
        p.extend(1.5f64.to_be_bytes());
        p.extend([b'N', 0x88, 0x87, b'q', 4]);
        p.extend([b'X', 1, 0, 0, 0, b'c', b'C', 2, b'x', b'y']);
        p.extend([b'X', 1, 0, 0, 0, b'd', b'h', 2]);
        p.extend([b'u', b'.']);
        let pk = parse_pickle(Path::new("t.pkl"), &p).unwrap();
        let j = to_json(&pk, &pk.root);
        assert_eq!(
            j,
            serde_json::json!({"a": [1, 2], "b": [1.5, null, true], "c": [120, 121], "d": [1, 2]})
        );
    }

    #[test]
    fn unknown_opcodes_and_truncation_name_the_offset() {
        let e = parse_pickle(Path::new("p.pkl"), &[0x80, 4, b'P'])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p.pkl") && e.contains("byte 2") && e.contains("PERSID"),
            "{e}"
        );
        let e = parse_pickle(Path::new("p.pkl"), &[0x80, 4, b'J', 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("BININT") && e.contains("ends first"), "{e}");
        let e = parse_pickle(Path::new("p.pkl"), &[0x80, 4, b'e'])
            .unwrap_err()
            .to_string();
        assert!(e.contains("APPENDS") && e.contains("MARK"), "{e}");
    }
}
