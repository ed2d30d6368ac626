//! The federated catalog: the public schema every party agrees on.
//!
//! A federated table is the union of every party's local table of that name.
//! Its columns, their types and the declared domains of group columns are
//! public; rows are private. Every gateway loads its own copy, and the
//! catalog's digest is part of every plan fingerprint, so two gateways with
//! different catalogs can never agree on a plan.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::PlanError;

/// Largest number of groups (the product of the group columns' domains,
/// NULL included) one query may range over. Every party computes and shares a
/// partial for every group, so this bounds the work and the traffic.
pub const MAX_GROUPS: usize = 1_000_000;

/// Fixed-point digits used for a float column when the catalog names none.
pub const DEFAULT_FLOAT_SCALE: u32 = 4;

/// The SQL type of a federated column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    /// 64-bit signed integer.
    Int,
    /// Exact decimal with the given precision and scale.
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// 64-bit float; aggregated in fixed point with `scale` decimal digits.
    Float {
        scale: u32,
    },
    Text,
    Bool,
    Date,
    /// Date and time without time zone, in microseconds (as PostgreSQL's
    /// `timestamp`).
    Timestamp,
}

impl ColumnType {
    pub fn parse(s: &str, float_scale: Option<u32>) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        let ty = match t.as_str() {
            "int" | "integer" | "bigint" | "int64" => ColumnType::Int,
            "float" | "double" | "float64" | "real" => ColumnType::Float {
                scale: float_scale.unwrap_or(DEFAULT_FLOAT_SCALE),
            },
            "text" | "string" | "varchar" | "utf8" => ColumnType::Text,
            "bool" | "boolean" => ColumnType::Bool,
            "date" => ColumnType::Date,
            "timestamp" | "datetime" => ColumnType::Timestamp,
            _ => {
                let inner = t
                    .strip_prefix("decimal(")
                    .or_else(|| t.strip_prefix("numeric("))
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| {
                        format!(
                            "unknown column type `{s}`; use int, decimal(P,S), float, text, bool, date or timestamp"
                        )
                    })?;
                let (p, sc) = inner.split_once(',').ok_or_else(|| {
                    format!("decimal type `{s}` needs a precision and a scale, as in decimal(12,2)")
                })?;
                let precision: u8 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad decimal precision in `{s}`"))?;
                let scale: i8 = sc
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad decimal scale in `{s}`"))?;
                if precision == 0 || precision > 38 || scale < 0 || scale as u8 > precision {
                    return Err(format!(
                        "decimal type `{s}` is out of range: precision must be 1..=38 and 0 <= scale <= precision"
                    ));
                }
                ColumnType::Decimal { precision, scale }
            }
        };
        if float_scale.is_some() && !matches!(ty, ColumnType::Float { .. }) {
            return Err(format!(
                "`scale` applies to float columns only, not to `{s}`"
            ));
        }
        Ok(ty)
    }

    pub fn arrow_type(&self) -> DataType {
        match self {
            ColumnType::Int => DataType::Int64,
            ColumnType::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            ColumnType::Float { .. } => DataType::Float64,
            ColumnType::Text => DataType::Utf8,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Date => DataType::Date32,
            ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::Int => write!(f, "int"),
            ColumnType::Decimal { precision, scale } => write!(f, "decimal({precision},{scale})"),
            ColumnType::Float { scale } => write!(f, "float(scale {scale})"),
            ColumnType::Text => write!(f, "text"),
            ColumnType::Bool => write!(f, "bool"),
            ColumnType::Date => write!(f, "date"),
            ColumnType::Timestamp => write!(f, "timestamp"),
        }
    }
}

/// One value of a declared public domain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DomainValue {
    Int(i64),
    Text(String),
    Bool(bool),
}

impl fmt::Display for DomainValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainValue::Int(v) => write!(f, "{v}"),
            DomainValue::Text(v) => write!(f, "{v:?}"),
            DomainValue::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// The public list of values a group column may take. NULL is always an
/// implicit member: SQL puts NULL keys in a group of their own.
///
/// The values are shared: a catalog is cloned into every plan, and a
/// declared domain may hold a million values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub values: Arc<Vec<DomainValue>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    pub name: String,
    pub ty: ColumnType,
    pub domain: Option<Domain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDef {
    pub name: String,
    pub columns: Vec<ColumnDef>,
}

impl TableDef {
    pub fn column(&self, name: &str) -> Option<&ColumnDef> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The Arrow schema every party's local table must present.
    pub fn schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|c| Field::new(&c.name, c.ty.arrow_type(), true))
                .collect::<Vec<_>>(),
        ))
    }
}

/// The federated catalog.
///
/// Built only by [`Catalog::from_toml`] (or empty), and read-only after:
/// its digest, which every plan's fingerprint covers, is computed once
/// there, since a catalog's text grows with its declared domains and a plan
/// is made for every query at every party.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    tables: BTreeMap<String, TableDef>,
    digest: String,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog::new(BTreeMap::new())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    tables: BTreeMap<String, RawTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    columns: Vec<RawColumn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    scale: Option<u32>,
    #[serde(default)]
    domain: Option<RawDomain>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDomain {
    Strings(Vec<String>),
    Ints(Vec<i64>),
    Bools(Vec<bool>),
    Range { min: i64, max: i64 },
}

impl Catalog {
    /// Parses a catalog from TOML text. `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, PlanError> {
        let raw: RawCatalog = toml::from_str(text)
            .map_err(|e| PlanError::Catalog(format!("{origin}: {}", e.to_string().trim_end())))?;
        let mut tables = BTreeMap::new();
        for (tname, rt) in raw.tables {
            let err = |m: String| PlanError::Catalog(format!("{origin}: table `{tname}`: {m}"));
            check_identifier(&tname).map_err(err)?;
            let mut columns: Vec<ColumnDef> = Vec::new();
            for rc in rt.columns {
                let cerr = |m: String| {
                    PlanError::Catalog(format!(
                        "{origin}: table `{tname}`, column `{}`: {m}",
                        rc.name
                    ))
                };
                check_identifier(&rc.name).map_err(cerr)?;
                if columns.iter().any(|c| c.name == rc.name) {
                    return Err(cerr("declared twice".into()));
                }
                let ty = ColumnType::parse(&rc.ty, rc.scale).map_err(cerr)?;
                if let ColumnType::Float { scale } = ty {
                    if scale > 12 {
                        return Err(cerr(format!(
                            "float scale {scale} is too fine; use at most 12 digits"
                        )));
                    }
                }
                let domain = match rc.domain {
                    None => None,
                    Some(d) => Some(Domain {
                        values: Arc::new(domain_values(&ty, d).map_err(cerr)?),
                    }),
                };
                columns.push(ColumnDef {
                    name: rc.name,
                    ty,
                    domain,
                });
            }
            if columns.is_empty() {
                return Err(err("has no columns".into()));
            }
            tables.insert(
                tname.clone(),
                TableDef {
                    name: tname,
                    columns,
                },
            );
        }
        Ok(Catalog::new(tables))
    }

    fn new(tables: BTreeMap<String, TableDef>) -> Self {
        let mut c = Catalog {
            tables,
            digest: String::new(),
        };
        c.digest = hex::encode(Sha256::digest(c.canonical().as_bytes()));
        c
    }

    /// Every federated table, by name.
    pub fn tables(&self) -> &BTreeMap<String, TableDef> {
        &self.tables
    }

    pub fn table(&self, name: &str) -> Option<&TableDef> {
        self.tables.get(name)
    }

    /// A canonical text form; its SHA-256 is the catalog digest.
    pub fn canonical(&self) -> String {
        let mut s = String::new();
        for t in self.tables.values() {
            s.push_str(&format!("table {}\n", t.name));
            for c in &t.columns {
                s.push_str(&format!("  {} {}", c.name, c.ty));
                if let Some(d) = &c.domain {
                    let vals: Vec<String> = d.values.iter().map(|v| v.to_string()).collect();
                    s.push_str(&format!(" domain [{}]", vals.join(", ")));
                }
                s.push('\n');
            }
        }
        s
    }

    /// The SHA-256 of [`Catalog::canonical`], computed when the catalog
    /// was built.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

fn domain_values(ty: &ColumnType, d: RawDomain) -> Result<Vec<DomainValue>, String> {
    let values: Vec<DomainValue> = match (ty, d) {
        (ColumnType::Text, RawDomain::Strings(v)) => v.into_iter().map(DomainValue::Text).collect(),
        (ColumnType::Int, RawDomain::Ints(v)) => v.into_iter().map(DomainValue::Int).collect(),
        (ColumnType::Int, RawDomain::Range { min, max }) => {
            if min > max {
                return Err(format!("domain range min {min} is above max {max}"));
            }
            let n = (max as i128 - min as i128 + 1) as u128;
            if n > MAX_GROUPS as u128 {
                return Err(format!("domain range has {n} values; at most {MAX_GROUPS} are allowed"));
            }
            (min..=max).map(DomainValue::Int).collect()
        }
        (ColumnType::Bool, RawDomain::Bools(v)) => v.into_iter().map(DomainValue::Bool).collect(),
        (ColumnType::Bool, RawDomain::Strings(v)) if v.is_empty() => Vec::new(),
        (ty, _) => {
            return Err(format!(
                "the domain does not match the column type {ty}: give a list of strings for text, \
                 a list of integers or {{ min = .., max = .. }} for int, a list of booleans for bool"
            ))
        }
    };
    if values.is_empty() {
        return Err("the domain is empty; list at least one value".into());
    }
    let mut sorted = values.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != values.len() {
        return Err("the domain lists a value twice".into());
    }
    Ok(values)
}

/// Identifiers are lower case so that SQL's case folding never makes two
/// gateways resolve a name differently.
pub fn check_identifier(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a valid name: use lower-case letters, digits and underscores"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = r#"
[tables.patients]
columns = [
  { name = "patient_id", type = "int" },
  { name = "age_band", type = "text", domain = ["0-17", "18-39"] },
  { name = "los", type = "int", domain = { min = 0, max = 3 } },
  { name = "cost", type = "decimal(12,2)" },
  { name = "score", type = "float", scale = 3 },
  { name = "readmitted", type = "bool", domain = [true, false] },
]
"#;

    #[test]
    fn parses_types_and_domains() {
        let c = Catalog::from_toml(CATALOG, "catalog.toml").unwrap();
        let t = c.table("patients").unwrap();
        assert_eq!(
            t.column("cost").unwrap().ty,
            ColumnType::Decimal {
                precision: 12,
                scale: 2
            }
        );
        assert_eq!(
            t.column("score").unwrap().ty,
            ColumnType::Float { scale: 3 }
        );
        assert_eq!(
            t.column("los")
                .unwrap()
                .domain
                .as_ref()
                .unwrap()
                .values
                .len(),
            4
        );
        assert_eq!(t.schema().fields().len(), 6);
    }

    #[test]
    fn digest_changes_with_any_domain_change() {
        let a = Catalog::from_toml(CATALOG, "a").unwrap();
        let b = Catalog::from_toml(&CATALOG.replace("\"18-39\"", "\"18-40\""), "b").unwrap();
        assert_ne!(a.digest(), b.digest());
        assert_eq!(
            a.digest(),
            Catalog::from_toml(CATALOG, "c").unwrap().digest()
        );
    }

    #[test]
    fn rejects_bad_declarations_with_the_cause() {
        let bad_type = CATALOG.replace("decimal(12,2)", "money");
        let e = Catalog::from_toml(&bad_type, "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown column type `money`"), "{e}");
        let bad_domain = CATALOG.replace("domain = [true, false]", "domain = [1, 2]");
        let e = Catalog::from_toml(&bad_domain, "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not match the column type bool"), "{e}");
        let upper = CATALOG.replace("patient_id", "PatientId");
        assert!(Catalog::from_toml(&upper, "x").is_err());
    }
}
