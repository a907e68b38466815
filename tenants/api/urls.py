from django.urls import path

from tenants.api import audit, keys, members, organization, teams

urlpatterns = [
    path("organization/", organization.OrganizationView.as_view(), name="api-organization"),
    path("teams/", teams.TeamListView.as_view(), name="api-teams"),
    path("teams/<int:pk>/", teams.TeamDetailView.as_view(), name="api-team"),
    path("keys/", keys.KeyListView.as_view(), name="api-keys"),
    path("keys/<int:pk>/", keys.KeyDetailView.as_view(), name="api-key"),
    path("keys/<int:pk>/rotate/", keys.KeyRotateView.as_view(), name="api-key-rotate"),
    path("keys/<int:pk>/revoke/", keys.KeyRevokeView.as_view(), name="api-key-revoke"),
    path("members/", members.MemberListView.as_view(), name="api-members"),
    path("members/<int:pk>/", members.MemberDetailView.as_view(), name="api-member"),
    path("invitations/", members.InvitationListView.as_view(), name="api-invitations"),
    path("invitations/<int:pk>/", members.InvitationDetailView.as_view(), name="api-invitation"),
    path("audit/", audit.AuditListView.as_view(), name="api-audit"),
    path("audit/<int:pk>/", audit.AuditDetailView.as_view(), name="api-audit-entry"),
]
