//! Operator roles and the policy table of the admin API: which role each
//! admin RPC needs and whether it mutates (and so is audited).
//!
//! The decision is a pure function of the RPC so that one table test covers
//! every admin RPC; a new RPC adds one row here (the test fails until it
//! does, because it compares this table with the services in the proto
//! descriptor). Nothing here knows about tonic, the store or who is calling.

use std::fmt;
use std::str::FromStr;

/// What an operator may do. Ordered: each role may do everything the roles
/// below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads: listings, machine details, the audit log.
    Viewer,
    /// Also changes the fleet: relabelling (later rollouts, set-image, quarantine).
    Operator,
    /// Also manages trust: tokens, operators, release keys, revocation, and
    /// people's SSH access (users, keys, grants).
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected viewer, operator or admin")]
pub struct UnknownRole(pub String);

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| UnknownRole(text.to_owned()))
    }
}

/// Every admin RPC (every RPC that needs an operator certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdminRpc {
    CreateToken,
    ListTokens,
    RevokeToken,
    ListMachines,
    GetMachine,
    WatchMachines,
    FleetStatus,
    SetLabels,
    SetImage,
    DecommissionMachine,
    PushImage,
    ListImages,
    GetImage,
    CreateOperator,
    ListOperators,
    SetOperatorRole,
    RevokeOperator,
    RenewOperatorCertificate,
    WhoAmI,
    AddReleaseKey,
    RemoveReleaseKey,
    ListReleaseKeys,
    ListAudit,
    QuarantineMachine,
    ReleaseMachine,
    GetForensics,
    ListRemediations,
    RemediationStatus,
    ZoneLossImpact,
    SinglePointsOfFailure,
    CreateRollout,
    ListRollouts,
    GetRollout,
    WatchRollout,
    PauseRollout,
    ResumeRollout,
    AbortRollout,
    ApproveRollout,
    RollbackRollout,
    StopAllRollouts,
    AddUser,
    ListUsers,
    GetUser,
    AddUserKey,
    RemoveUserKey,
    RevokeUser,
    Grant,
    RevokeGrant,
    ListGrants,
    AccessStatus,
    AccessReport,
    VerifyImages,
    ListVerifications,
    RestoreImage,
}

/// One row of the policy table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcPolicy {
    /// `/package.Service/Method`, as on the wire.
    pub method_path: &'static str,
    /// The audit log's name for the action.
    pub action: &'static str,
    pub required_role: Role,
    /// Mutating calls are written to the audit log before they answer.
    pub mutating: bool,
}

const fn policy(
    method_path: &'static str,
    action: &'static str,
    required_role: Role,
    mutating: bool,
) -> RpcPolicy {
    RpcPolicy {
        method_path,
        action,
        required_role,
        mutating,
    }
}

impl AdminRpc {
    pub const ALL: [AdminRpc; 54] = [
        AdminRpc::CreateToken,
        AdminRpc::ListTokens,
        AdminRpc::RevokeToken,
        AdminRpc::ListMachines,
        AdminRpc::GetMachine,
        AdminRpc::WatchMachines,
        AdminRpc::FleetStatus,
        AdminRpc::SetLabels,
        AdminRpc::SetImage,
        AdminRpc::DecommissionMachine,
        AdminRpc::PushImage,
        AdminRpc::ListImages,
        AdminRpc::GetImage,
        AdminRpc::CreateOperator,
        AdminRpc::ListOperators,
        AdminRpc::SetOperatorRole,
        AdminRpc::RevokeOperator,
        AdminRpc::RenewOperatorCertificate,
        AdminRpc::WhoAmI,
        AdminRpc::AddReleaseKey,
        AdminRpc::RemoveReleaseKey,
        AdminRpc::ListReleaseKeys,
        AdminRpc::ListAudit,
        AdminRpc::QuarantineMachine,
        AdminRpc::ReleaseMachine,
        AdminRpc::GetForensics,
        AdminRpc::ListRemediations,
        AdminRpc::RemediationStatus,
        AdminRpc::ZoneLossImpact,
        AdminRpc::SinglePointsOfFailure,
        AdminRpc::CreateRollout,
        AdminRpc::ListRollouts,
        AdminRpc::GetRollout,
        AdminRpc::WatchRollout,
        AdminRpc::PauseRollout,
        AdminRpc::ResumeRollout,
        AdminRpc::AbortRollout,
        AdminRpc::ApproveRollout,
        AdminRpc::RollbackRollout,
        AdminRpc::StopAllRollouts,
        AdminRpc::AddUser,
        AdminRpc::ListUsers,
        AdminRpc::GetUser,
        AdminRpc::AddUserKey,
        AdminRpc::RemoveUserKey,
        AdminRpc::RevokeUser,
        AdminRpc::Grant,
        AdminRpc::RevokeGrant,
        AdminRpc::ListGrants,
        AdminRpc::AccessStatus,
        AdminRpc::AccessReport,
        AdminRpc::VerifyImages,
        AdminRpc::ListVerifications,
        AdminRpc::RestoreImage,
    ];

    /// The policy of this RPC: the whole table, one row per RPC.
    pub fn policy(self) -> RpcPolicy {
        use Role::{Admin, Operator, Viewer};
        match self {
            AdminRpc::CreateToken => {
                policy("/flotte.v1.Tokens/CreateToken", "token.create", Admin, true)
            }
            AdminRpc::ListTokens => {
                policy("/flotte.v1.Tokens/ListTokens", "token.list", Viewer, false)
            }
            AdminRpc::RevokeToken => {
                policy("/flotte.v1.Tokens/RevokeToken", "token.revoke", Admin, true)
            }
            AdminRpc::ListMachines => policy(
                "/flotte.v1.Machines/ListMachines",
                "machine.list",
                Viewer,
                false,
            ),
            AdminRpc::GetMachine => policy(
                "/flotte.v1.Machines/GetMachine",
                "machine.get",
                Viewer,
                false,
            ),
            AdminRpc::WatchMachines => {
                policy("/flotte.v1.Machines/Watch", "machine.watch", Viewer, false)
            }
            AdminRpc::FleetStatus => policy(
                "/flotte.v1.Machines/FleetStatus",
                "machine.status",
                Viewer,
                false,
            ),
            AdminRpc::SetLabels => policy(
                "/flotte.v1.Machines/SetLabels",
                "machine.label",
                Operator,
                true,
            ),
            AdminRpc::SetImage => policy(
                "/flotte.v1.Machines/SetImage",
                "machine.set-image",
                Operator,
                true,
            ),
            AdminRpc::PushImage => {
                policy("/flotte.v1.Images/PushImage", "image.push", Operator, true)
            }
            AdminRpc::ListImages => {
                policy("/flotte.v1.Images/ListImages", "image.list", Viewer, false)
            }
            AdminRpc::GetImage => policy("/flotte.v1.Images/GetImage", "image.get", Viewer, false),
            AdminRpc::DecommissionMachine => policy(
                "/flotte.v1.Machines/DecommissionMachine",
                "machine.decommission",
                Admin,
                true,
            ),
            AdminRpc::CreateOperator => policy(
                "/flotte.v1.Operators/CreateOperator",
                "operator.create",
                Admin,
                true,
            ),
            AdminRpc::ListOperators => policy(
                "/flotte.v1.Operators/ListOperators",
                "operator.list",
                Viewer,
                false,
            ),
            AdminRpc::SetOperatorRole => policy(
                "/flotte.v1.Operators/SetOperatorRole",
                "operator.set-role",
                Admin,
                true,
            ),
            AdminRpc::RevokeOperator => policy(
                "/flotte.v1.Operators/RevokeOperator",
                "operator.revoke",
                Admin,
                true,
            ),
            // Every operator renews its own certificate (the server takes the
            // name from the caller's identity, never from the request).
            AdminRpc::RenewOperatorCertificate => policy(
                "/flotte.v1.Operators/RenewOperatorCertificate",
                "operator.renew",
                Viewer,
                true,
            ),
            AdminRpc::WhoAmI => policy(
                "/flotte.v1.Operators/WhoAmI",
                "operator.whoami",
                Viewer,
                false,
            ),
            AdminRpc::AddReleaseKey => policy(
                "/flotte.v1.ReleaseKeys/AddReleaseKey",
                "release-key.add",
                Admin,
                true,
            ),
            AdminRpc::RemoveReleaseKey => policy(
                "/flotte.v1.ReleaseKeys/RemoveReleaseKey",
                "release-key.remove",
                Admin,
                true,
            ),
            AdminRpc::ListReleaseKeys => policy(
                "/flotte.v1.ReleaseKeys/ListReleaseKeys",
                "release-key.list",
                Viewer,
                false,
            ),
            AdminRpc::ListAudit => {
                policy("/flotte.v1.Audit/ListAudit", "audit.list", Viewer, false)
            }
            AdminRpc::QuarantineMachine => policy(
                "/flotte.v1.Repair/QuarantineMachine",
                "machine.quarantine",
                Operator,
                true,
            ),
            AdminRpc::ReleaseMachine => policy(
                "/flotte.v1.Repair/ReleaseMachine",
                "machine.release",
                Operator,
                true,
            ),
            // Forensic bundles hold process lists and logs: more than a viewer sees.
            AdminRpc::GetForensics => policy(
                "/flotte.v1.Repair/GetForensics",
                "machine.forensics",
                Operator,
                false,
            ),
            AdminRpc::ListRemediations => policy(
                "/flotte.v1.Repair/ListRemediations",
                "remediation.list",
                Viewer,
                false,
            ),
            AdminRpc::RemediationStatus => policy(
                "/flotte.v1.Repair/RemediationStatus",
                "remediation.status",
                Viewer,
                false,
            ),
            AdminRpc::ZoneLossImpact => policy(
                "/flotte.v1.DisasterRecovery/ZoneLossImpact",
                "dr.impact",
                Viewer,
                false,
            ),
            AdminRpc::SinglePointsOfFailure => policy(
                "/flotte.v1.DisasterRecovery/SinglePointsOfFailure",
                "dr.report",
                Viewer,
                false,
            ),
            AdminRpc::CreateRollout => policy(
                "/flotte.v1.Rollouts/CreateRollout",
                "rollout.create",
                Operator,
                true,
            ),
            AdminRpc::ListRollouts => policy(
                "/flotte.v1.Rollouts/ListRollouts",
                "rollout.list",
                Viewer,
                false,
            ),
            AdminRpc::GetRollout => policy(
                "/flotte.v1.Rollouts/GetRollout",
                "rollout.get",
                Viewer,
                false,
            ),
            AdminRpc::WatchRollout => policy(
                "/flotte.v1.Rollouts/WatchRollout",
                "rollout.watch",
                Viewer,
                false,
            ),
            AdminRpc::PauseRollout => policy(
                "/flotte.v1.Rollouts/PauseRollout",
                "rollout.pause",
                Operator,
                true,
            ),
            AdminRpc::ResumeRollout => policy(
                "/flotte.v1.Rollouts/ResumeRollout",
                "rollout.resume",
                Operator,
                true,
            ),
            AdminRpc::AbortRollout => policy(
                "/flotte.v1.Rollouts/AbortRollout",
                "rollout.abort",
                Operator,
                true,
            ),
            AdminRpc::ApproveRollout => policy(
                "/flotte.v1.Rollouts/ApproveRollout",
                "rollout.approve",
                Operator,
                true,
            ),
            AdminRpc::RollbackRollout => policy(
                "/flotte.v1.Rollouts/RollbackRollout",
                "rollout.rollback",
                Operator,
                true,
            ),
            AdminRpc::StopAllRollouts => policy(
                "/flotte.v1.Rollouts/StopAllRollouts",
                "rollout.stop-all",
                Operator,
                true,
            ),
            AdminRpc::AddUser => policy("/flotte.v1.Users/AddUser", "user.add", Admin, true),
            AdminRpc::ListUsers => policy("/flotte.v1.Users/ListUsers", "user.list", Viewer, false),
            AdminRpc::GetUser => policy("/flotte.v1.Users/GetUser", "user.get", Viewer, false),
            AdminRpc::AddUserKey => {
                policy("/flotte.v1.Users/AddUserKey", "user.key-add", Admin, true)
            }
            AdminRpc::RemoveUserKey => policy(
                "/flotte.v1.Users/RemoveUserKey",
                "user.key-remove",
                Admin,
                true,
            ),
            AdminRpc::RevokeUser => {
                policy("/flotte.v1.Users/RevokeUser", "user.revoke", Admin, true)
            }
            AdminRpc::Grant => policy("/flotte.v1.Access/Grant", "access.grant", Admin, true),
            AdminRpc::RevokeGrant => policy(
                "/flotte.v1.Access/RevokeGrant",
                "access.revoke",
                Admin,
                true,
            ),
            AdminRpc::ListGrants => {
                policy("/flotte.v1.Access/ListGrants", "access.list", Viewer, false)
            }
            AdminRpc::AccessStatus => policy(
                "/flotte.v1.Access/AccessStatus",
                "access.status",
                Viewer,
                false,
            ),
            AdminRpc::AccessReport => policy(
                "/flotte.v1.Access/AccessReport",
                "access.report",
                Viewer,
                false,
            ),
            // Asking for a verification costs every chosen machine a full
            // read of its image: an operator's call, audited.
            AdminRpc::VerifyImages => policy(
                "/flotte.v1.ImageIntegrity/VerifyImages",
                "image.verify",
                Operator,
                true,
            ),
            AdminRpc::ListVerifications => policy(
                "/flotte.v1.ImageIntegrity/ListVerifications",
                "image.verifications",
                Viewer,
                false,
            ),
            AdminRpc::RestoreImage => policy(
                "/flotte.v1.ImageIntegrity/RestoreImage",
                "image.restore",
                Operator,
                true,
            ),
        }
    }
}

/// The least role that may call `rpc`.
pub fn required_role(rpc: AdminRpc) -> Role {
    rpc.policy().required_role
}

/// Whether an operator with `role` may call `rpc`.
pub fn may_call(role: Role, rpc: AdminRpc) -> bool {
    role >= required_role(rpc)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;

    use super::*;

    /// The whole policy, written out once more: a change to a row must be
    /// made here too, on purpose.
    const EXPECTED: &[(AdminRpc, Role, bool)] = &[
        (AdminRpc::CreateToken, Role::Admin, true),
        (AdminRpc::ListTokens, Role::Viewer, false),
        (AdminRpc::RevokeToken, Role::Admin, true),
        (AdminRpc::ListMachines, Role::Viewer, false),
        (AdminRpc::GetMachine, Role::Viewer, false),
        (AdminRpc::WatchMachines, Role::Viewer, false),
        (AdminRpc::FleetStatus, Role::Viewer, false),
        (AdminRpc::SetLabels, Role::Operator, true),
        (AdminRpc::SetImage, Role::Operator, true),
        (AdminRpc::DecommissionMachine, Role::Admin, true),
        (AdminRpc::PushImage, Role::Operator, true),
        (AdminRpc::ListImages, Role::Viewer, false),
        (AdminRpc::GetImage, Role::Viewer, false),
        (AdminRpc::CreateOperator, Role::Admin, true),
        (AdminRpc::ListOperators, Role::Viewer, false),
        (AdminRpc::SetOperatorRole, Role::Admin, true),
        (AdminRpc::RevokeOperator, Role::Admin, true),
        (AdminRpc::RenewOperatorCertificate, Role::Viewer, true),
        (AdminRpc::WhoAmI, Role::Viewer, false),
        (AdminRpc::AddReleaseKey, Role::Admin, true),
        (AdminRpc::RemoveReleaseKey, Role::Admin, true),
        (AdminRpc::ListReleaseKeys, Role::Viewer, false),
        (AdminRpc::ListAudit, Role::Viewer, false),
        (AdminRpc::QuarantineMachine, Role::Operator, true),
        (AdminRpc::ReleaseMachine, Role::Operator, true),
        (AdminRpc::GetForensics, Role::Operator, false),
        (AdminRpc::ListRemediations, Role::Viewer, false),
        (AdminRpc::RemediationStatus, Role::Viewer, false),
        (AdminRpc::ZoneLossImpact, Role::Viewer, false),
        (AdminRpc::SinglePointsOfFailure, Role::Viewer, false),
        (AdminRpc::CreateRollout, Role::Operator, true),
        (AdminRpc::ListRollouts, Role::Viewer, false),
        (AdminRpc::GetRollout, Role::Viewer, false),
        (AdminRpc::WatchRollout, Role::Viewer, false),
        (AdminRpc::PauseRollout, Role::Operator, true),
        (AdminRpc::ResumeRollout, Role::Operator, true),
        (AdminRpc::AbortRollout, Role::Operator, true),
        (AdminRpc::ApproveRollout, Role::Operator, true),
        (AdminRpc::RollbackRollout, Role::Operator, true),
        (AdminRpc::StopAllRollouts, Role::Operator, true),
        (AdminRpc::AddUser, Role::Admin, true),
        (AdminRpc::ListUsers, Role::Viewer, false),
        (AdminRpc::GetUser, Role::Viewer, false),
        (AdminRpc::AddUserKey, Role::Admin, true),
        (AdminRpc::RemoveUserKey, Role::Admin, true),
        (AdminRpc::RevokeUser, Role::Admin, true),
        (AdminRpc::Grant, Role::Admin, true),
        (AdminRpc::RevokeGrant, Role::Admin, true),
        (AdminRpc::ListGrants, Role::Viewer, false),
        (AdminRpc::AccessStatus, Role::Viewer, false),
        (AdminRpc::AccessReport, Role::Viewer, false),
        (AdminRpc::VerifyImages, Role::Operator, true),
        (AdminRpc::ListVerifications, Role::Viewer, false),
        (AdminRpc::RestoreImage, Role::Operator, true),
    ];

    #[test]
    fn every_admin_rpc_has_its_role_and_mutation_flag() {
        assert_eq!(EXPECTED.len(), AdminRpc::ALL.len());
        for (rpc, role, mutating) in EXPECTED {
            assert_eq!(required_role(*rpc), *role, "{rpc:?}");
            assert_eq!(rpc.policy().mutating, *mutating, "{rpc:?}");
            for caller in Role::ALL {
                assert_eq!(may_call(caller, *rpc), caller >= *role, "{caller} {rpc:?}");
            }
        }
        assert!(!may_call(Role::Viewer, AdminRpc::CreateToken));
        assert!(!may_call(Role::Viewer, AdminRpc::SetLabels));
        assert!(may_call(Role::Operator, AdminRpc::SetLabels));
        assert!(!may_call(Role::Operator, AdminRpc::CreateOperator));
    }

    /// Services whose RPCs are not admin RPCs (no operator certificate).
    const NON_ADMIN_SERVICES: &[&str] = &["flotte.v1.Enrollment", "flotte.v1.AgentSession"];

    #[test]
    fn the_table_covers_exactly_the_admin_rpcs_of_the_proto_contract() {
        let descriptors =
            prost_types::FileDescriptorSet::decode(flotte_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut in_proto = BTreeSet::new();
        for file in &descriptors.file {
            for service in &file.service {
                let service_name = format!("{}.{}", file.package(), service.name());
                if NON_ADMIN_SERVICES.contains(&service_name.as_str()) {
                    continue;
                }
                for method in &service.method {
                    in_proto.insert(format!("/{service_name}/{}", method.name()));
                }
            }
        }
        let in_table: BTreeSet<String> = AdminRpc::ALL
            .iter()
            .map(|rpc| rpc.policy().method_path.to_owned())
            .collect();
        assert_eq!(
            in_table, in_proto,
            "every admin RPC needs exactly one row in AdminRpc::policy"
        );
        let actions: BTreeSet<&str> = AdminRpc::ALL
            .iter()
            .map(|rpc| rpc.policy().action)
            .collect();
        assert_eq!(
            actions.len(),
            AdminRpc::ALL.len(),
            "action names are unique"
        );
    }

    #[test]
    fn roles_parse_and_print() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!("root".parse::<Role>().is_err());
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }
}
