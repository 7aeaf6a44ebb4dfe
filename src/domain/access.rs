//! Who is calling and what they may do: tenants, roles, and the deny-by-default
//! table of which role each action needs.

use std::fmt;

use super::error::VaultError;

/// A tenant name: 1–64 characters of `[a-z0-9_-]`, so it can be bound into
/// associated data and audit records without escaping.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

/// A string that is not a tenant name. Deliberately says nothing of the
/// input: it is caller text, which may hold anything (a card number too), and
/// this message goes back to callers and into audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a tenant must be 1-64 characters of a-z, 0-9, '_' or '-'")]
pub struct BadTenantId;

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, BadTenantId> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(BadTenantId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

/// A role granted to a caller identity by configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Tokenize,
    Detokenize,
    Audit,
    Admin,
    /// Holds a share of a split KEK and may submit it to unseal the vault.
    Custodian,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tokenize" => Some(Self::Tokenize),
            "detokenize" => Some(Self::Detokenize),
            "audit" => Some(Self::Audit),
            "admin" => Some(Self::Admin),
            "custodian" => Some(Self::Custodian),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tokenize => "tokenize",
            Self::Detokenize => "detokenize",
            Self::Audit => "audit",
            Self::Admin => "admin",
            Self::Custodian => "custodian",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::Tokenize => 1,
            Self::Detokenize => 2,
            Self::Audit => 4,
            Self::Admin => 8,
            Self::Custodian => 16,
        }
    }
}

/// A set of roles, small enough to copy.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleSet(u8);

impl RoleSet {
    pub fn new(roles: impl IntoIterator<Item = Role>) -> Self {
        Self(roles.into_iter().fold(0, |acc, r| acc | r.bit()))
    }

    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    fn intersects(self, other: RoleSet) -> bool {
        self.0 & other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for RoleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = [
            Role::Tokenize,
            Role::Detokenize,
            Role::Audit,
            Role::Admin,
            Role::Custodian,
        ];
        f.debug_set()
            .entries(
                all.iter()
                    .filter(|r| self.contains(**r))
                    .map(|r| r.as_str()),
            )
            .finish()
    }
}

/// Which tenants a grant reaches: one, or all (for auditors and
/// administrators configured with `tenant = "*"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    One(TenantId),
    All,
}

/// What configuration grants an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub scope: TenantScope,
    pub roles: RoleSet,
}

/// An authenticated caller as the core sees it. `grant` is `None` when the
/// certificate was valid but configuration maps it to nothing: such a caller
/// may do nothing at all.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: String,
    pub peer: Option<String>,
    pub grant: Option<Grant>,
}

/// An operation a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Tokenize,
    Detokenize,
    GetMetadata,
    DeleteToken,
    /// Read key status and job progress.
    ReadKeys,
    /// Rotate, destroy, shred, re-encrypt, seal.
    ManageKeys,
    /// Submit an unseal share, or read unseal progress.
    Unseal,
    /// Read the audit log (auditors only: administrators act, auditors
    /// review).
    ReadAudit,
}

impl Action {
    /// The roles any one of which allows the action. This table is the whole
    /// of the data-plane authorization policy.
    fn allowed_roles(self) -> RoleSet {
        match self {
            Self::Tokenize => RoleSet::new([Role::Tokenize]),
            Self::Detokenize => RoleSet::new([Role::Detokenize]),
            Self::GetMetadata => {
                RoleSet::new([Role::Tokenize, Role::Detokenize, Role::Audit, Role::Admin])
            }
            Self::DeleteToken => RoleSet::new([Role::Tokenize, Role::Admin]),
            Self::ReadKeys => RoleSet::new([Role::Admin, Role::Audit]),
            Self::ManageKeys => RoleSet::new([Role::Admin]),
            Self::Unseal => RoleSet::new([Role::Admin, Role::Custodian]),
            Self::ReadAudit => RoleSet::new([Role::Audit]),
        }
    }
}

impl Caller {
    /// Deny by default: succeeds only if the caller's grant holds one of the
    /// roles the action needs.
    pub fn authorize(&self, action: Action) -> Result<&Grant, VaultError> {
        let Some(grant) = &self.grant else {
            return Err(VaultError::PermissionDenied(
                "caller identity is not mapped to any tenant or role".into(),
            ));
        };
        if !grant.roles.intersects(action.allowed_roles()) {
            return Err(VaultError::PermissionDenied(format!(
                "caller lacks a role permitted to {}",
                action.describe()
            )));
        }
        Ok(grant)
    }

    /// Whether the caller's grant allows `action` (for policy that depends
    /// on what else a caller may do; access itself goes through
    /// [`Caller::authorize`]).
    pub fn may(&self, action: Action) -> bool {
        self.authorize(action).is_ok()
    }

    /// The tenant a new token is created for: only a single-tenant grant can
    /// tokenize, so a token always has exactly one owner.
    pub fn home_tenant(&self) -> Option<&TenantId> {
        match &self.grant {
            Some(Grant {
                scope: TenantScope::One(t),
                ..
            }) => Some(t),
            _ => None,
        }
    }

    /// Whether the caller's grant reaches `tenant`.
    pub fn reaches(&self, tenant: &TenantId) -> bool {
        self.reaches_name(tenant.as_str())
    }

    /// Whether the caller's grant reaches the tenant named `tenant` (as
    /// stored with a key, job or token).
    pub fn reaches_name(&self, tenant: &str) -> bool {
        match &self.grant {
            Some(Grant {
                scope: TenantScope::All,
                ..
            }) => true,
            Some(Grant {
                scope: TenantScope::One(t),
                ..
            }) => t.as_str() == tenant,
            None => false,
        }
    }

    /// Authorizes `action` on the tenant the request names, and returns that
    /// tenant parsed. A caller whose grant is for one tenant is refused any
    /// other name before it is parsed, so a malformed or unknown name gets
    /// exactly the answer another tenant's does: existence never leaks.
    pub fn authorize_tenant(&self, action: Action, tenant: &str) -> Result<TenantId, VaultError> {
        match &self.authorize(action)?.scope {
            TenantScope::One(t) if t.as_str() == tenant => Ok(t.clone()),
            TenantScope::One(_) => Err(VaultError::PermissionDenied(
                "caller's grant does not reach this tenant".into(),
            )),
            TenantScope::All => {
                TenantId::parse(tenant).map_err(|e| VaultError::InvalidArgument(e.to_string()))
            }
        }
    }

    /// Authorizes `action` where it affects or reveals every tenant at once
    /// (the KEK, sealing, a full export of the audit log): a grant for one
    /// tenant is not enough.
    pub fn authorize_all(&self, action: Action) -> Result<&Grant, VaultError> {
        let grant = self.authorize(action)?;
        if grant.scope != TenantScope::All {
            return Err(VaultError::PermissionDenied(format!(
                "caller's grant is for one tenant; to {} across every tenant needs tenant = \"*\"",
                action.describe()
            )));
        }
        Ok(grant)
    }
}

impl Action {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Tokenize => "tokenize",
            Self::Detokenize => "detokenize",
            Self::GetMetadata => "read token metadata",
            Self::DeleteToken => "delete tokens",
            Self::ReadKeys => "read key status",
            Self::ManageKeys => "manage keys",
            Self::Unseal => "unseal the vault",
            Self::ReadAudit => "read the audit log",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(roles: &[Role], scope: TenantScope) -> Caller {
        Caller {
            identity: "spiffe://test/x".into(),
            peer: None,
            grant: Some(Grant {
                scope,
                roles: RoleSet::new(roles.iter().copied()),
            }),
        }
    }

    #[test]
    fn unmapped_caller_may_do_nothing() {
        let c = Caller {
            identity: "x".into(),
            peer: None,
            grant: None,
        };
        for a in [
            Action::Tokenize,
            Action::Detokenize,
            Action::GetMetadata,
            Action::DeleteToken,
        ] {
            assert!(matches!(
                c.authorize(a),
                Err(VaultError::PermissionDenied(_))
            ));
        }
    }

    #[test]
    fn role_table_matches_policy() {
        let acme = || TenantScope::One(TenantId::parse("acme").unwrap());
        let expect = [
            (Role::Tokenize, [true, false, true, true]),
            (Role::Detokenize, [false, true, true, false]),
            (Role::Audit, [false, false, true, false]),
            (Role::Admin, [false, false, true, true]),
        ];
        let actions = [
            Action::Tokenize,
            Action::Detokenize,
            Action::GetMetadata,
            Action::DeleteToken,
        ];
        for (role, allowed) in expect {
            let c = caller(&[role], acme());
            for (a, ok) in actions.iter().zip(allowed) {
                assert_eq!(c.authorize(*a).is_ok(), ok, "{role:?} {a:?}");
            }
        }
    }

    #[test]
    fn scope_limits_tenants() {
        let acme = TenantId::parse("acme").unwrap();
        let globex = TenantId::parse("globex").unwrap();
        let c = caller(&[Role::Tokenize], TenantScope::One(acme.clone()));
        assert!(c.reaches(&acme));
        assert!(!c.reaches(&globex));
        let all = caller(&[Role::Audit], TenantScope::All);
        assert!(all.reaches(&globex));
        assert!(all.home_tenant().is_none());
    }

    #[test]
    fn tenant_names_are_restricted() {
        assert!(TenantId::parse("acme-1_x").is_ok());
        for bad in ["", "Acme", "a b", "a/b", &"x".repeat(65)] {
            assert!(TenantId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_rejected_tenant_name_is_not_echoed() {
        // Built at run time: no card-number literal in src/.
        let input = format!("tenant 4{}", "1".repeat(15));
        let e = TenantId::parse(&input).unwrap_err().to_string();
        assert!(!e.contains("1111"), "{e}");
        assert!(!e.contains(&input), "{e}");
        assert_eq!(e, TenantId::parse("Acme").unwrap_err().to_string());
    }

    #[test]
    fn a_scoped_grant_is_refused_other_tenants_before_parsing() {
        let acme = TenantId::parse("acme").unwrap();
        let admin = caller(&[Role::Admin], TenantScope::One(acme.clone()));
        assert_eq!(
            admin.authorize_tenant(Action::ManageKeys, "acme").unwrap(),
            acme
        );
        // Another tenant, an unknown one and a malformed name: one answer.
        let refusals: Vec<_> = ["globex", "nobody", "Not A Tenant"]
            .iter()
            .map(|t| admin.authorize_tenant(Action::ManageKeys, t).unwrap_err())
            .collect();
        assert!(matches!(refusals[0], VaultError::PermissionDenied(_)));
        assert!(refusals.iter().all(|e| *e == refusals[0]), "{refusals:?}");
        // The role is checked first.
        let auditor = caller(&[Role::Audit], TenantScope::One(acme));
        assert!(matches!(
            auditor.authorize_tenant(Action::ManageKeys, "acme"),
            Err(VaultError::PermissionDenied(_))
        ));
        let global = caller(&[Role::Admin], TenantScope::All);
        assert!(
            global
                .authorize_tenant(Action::ManageKeys, "globex")
                .is_ok()
        );
        assert!(matches!(
            global.authorize_tenant(Action::ManageKeys, "Not A Tenant"),
            Err(VaultError::InvalidArgument(_))
        ));
    }

    #[test]
    fn vault_wide_actions_need_a_grant_for_every_tenant() {
        let scoped = caller(
            &[Role::Admin, Role::Audit],
            TenantScope::One(TenantId::parse("acme").unwrap()),
        );
        assert!(scoped.authorize(Action::ManageKeys).is_ok());
        assert!(matches!(
            scoped.authorize_all(Action::ManageKeys),
            Err(VaultError::PermissionDenied(_))
        ));
        assert!(matches!(
            scoped.authorize_all(Action::ReadAudit),
            Err(VaultError::PermissionDenied(_))
        ));
        let global = caller(&[Role::Admin], TenantScope::All);
        assert!(global.authorize_all(Action::ManageKeys).is_ok());
        assert!(matches!(
            global.authorize_all(Action::ReadAudit),
            Err(VaultError::PermissionDenied(_))
        ));
    }
}
